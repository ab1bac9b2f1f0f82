//! The `master` binary.

// Integrated with the scheduler once its core lands (issue 5).
#[allow(dead_code)]
mod latent;
#[allow(dead_code)]
mod locks;
#[allow(dead_code)]
mod master_schedule;
#[allow(dead_code)]
mod reconfig;

fn main() {}
