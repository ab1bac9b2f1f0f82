//! Throwaway cgroup v2 directories for the tests of the agent's cgroup mode.

use crate::*;

/// A fresh cgroup v2 directory for an agent to run in (as systemd's
/// `Delegate=yes` gives one), removed with everything under it on drop; or a
/// loud failure. The cgroup tests must run where a cgroup can be created (CI
/// runs as root); `NIGHTSHIFT_SKIP_CGROUP_TESTS=1` skips them explicitly
/// (`Ok(None)`).
pub fn test_cgroup(tag: &str) -> anyhow::Result<Option<TestCgroup>> {
    let made = (|| -> anyhow::Result<PathBuf> {
        let mounts = fs_err::read_to_string("/proc/self/mountinfo")?;
        let mount = mounts
            .lines()
            .find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                (after.split_whitespace().next()? == "cgroup2")
                    .then(|| before.split_whitespace().nth(4).map(PathBuf::from))?
            })
            .context("no cgroup2 mount in /proc/self/mountinfo")?;
        let own = fs_err::read_to_string("/proc/self/cgroup")?;
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .context("no cgroup v2 line in /proc/self/cgroup")?
            .trim_start_matches('/')
            .to_owned();
        let dir = mount
            .join(relative)
            .join(format!("nightshift-e2e-{}-{tag}", std::process::id()));
        fs_err::create_dir(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
        Ok(dir)
    })();
    match made {
        Ok(dir) => Ok(Some(TestCgroup(dir))),
        Err(_) if std::env::var("NIGHTSHIFT_SKIP_CGROUP_TESTS").is_ok_and(|v| v == "1") => {
            eprintln!("cgroup test skipped: NIGHTSHIFT_SKIP_CGROUP_TESTS=1");
            Ok(None)
        }
        Err(error) => Err(error.context(
            "cannot create a cgroup v2 for this test; run as root on a cgroup v2 host, or set NIGHTSHIFT_SKIP_CGROUP_TESTS=1 to skip the cgroup tests",
        )),
    }
}

/// A cgroup made by [`test_cgroup`]; removed (children first) on drop, once
/// the processes in it are gone.
#[derive(Debug)]
pub struct TestCgroup(pub PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        fn remove(dir: &Path) {
            if let Ok(entries) = fs_err::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.path().is_dir() {
                        remove(&entry.path());
                    }
                }
            }
            let _ = fs_err::remove_dir(dir);
        }
        for _ in 0..50 {
            remove(&self.0);
            if !self.0.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
