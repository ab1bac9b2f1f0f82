//! The `master` binary.

fn main() {}
