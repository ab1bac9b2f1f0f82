//! The `master` binary.

// Integrated with the scheduler once its core lands (issue 5).
#[allow(dead_code)]
mod latent;
#[allow(dead_code)]
mod locks;

fn main() {}
