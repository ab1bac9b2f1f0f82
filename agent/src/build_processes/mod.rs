//! How a build's processes are placed, prioritized, found and measured, below
//! everything that starts builds: the `[builds]` settings and the priorities
//! applied between fork and exec ([`priority`]), one cgroup per build
//! ([`build_cgroup`]), the process trees of builds ([`build_tree`]), and the
//! machine's load split into the builds' share and the owner's ([`load`]).

pub mod build_cgroup;
pub mod build_tree;
pub mod load;
pub mod priority;
