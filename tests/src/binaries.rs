//! Finding the `master` and `worker` binaries under test, building them, and refusing stale ones.

use crate::*;

/// The directory holding the `master` and `worker` binaries the tests run,
/// built from the sources of this checkout: `NIGHTSHIFT_BIN_DIR`, else the
/// `target/<profile>` directory above this test executable, where they are
/// first built (`cargo build --workspace --bins` for that profile, once per
/// test process). Either way, binaries older than any of their sources are
/// refused: a test never passes against yesterday's code.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    static CHECKED: std::sync::OnceLock<Result<PathBuf, String>> = std::sync::OnceLock::new();
    CHECKED
        .get_or_init(|| find_fresh_binaries().map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(|e| anyhow!(e))
}

/// The workspace root (this crate's parent directory).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn find_fresh_binaries() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("NIGHTSHIFT_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let exe = std::env::current_exe().context("cannot locate the test executable")?;
            // target/<profile>/deps/<test>-<hash> or target/<profile>/<bin>
            let mut dir = exe
                .parent()
                .context("the test executable has no directory")?
                .to_path_buf();
            if dir.file_name().is_some_and(|name| name == "deps") {
                dir.pop();
            }
            build_binaries(&dir)?;
            dir
        }
    };
    for name in ["master", "worker"] {
        let binary = dir.join(name);
        let built = fs_err::metadata(&binary)
            .and_then(|m| m.modified())
            .with_context(|| {
                format!(
                    "cannot find {}: run `cargo build --workspace --bins` (or set NIGHTSHIFT_BIN_DIR)",
                    binary.display()
                )
            })?;
        let own = if name == "master" { "master" } else { "agent" };
        if let Some((source, changed)) = newest_source(&[own, "proto", "policy"])?
            && changed > built
        {
            bail!(
                "{} is older than {}: it was not built from these sources; run `cargo build \
                 --workspace --bins` (with the profile of the tests) and test again",
                binary.display(),
                source.display()
            );
        }
    }
    Ok(dir)
}

/// `cargo build --workspace --bins` for the profile of `dir`
/// (`target/debug` → dev, `target/release` → release). Cargo that waits for
/// the build directory's lock (another cargo holds it) is not waited for:
/// the freshness check then decides.
fn build_binaries(dir: &std::path::Path) -> anyhow::Result<()> {
    if std::env::var_os("NIGHTSHIFT_TEST_NO_BUILD").is_some() {
        return Ok(());
    }
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev".to_owned(),
        Some(name) => name.to_owned(),
        None => bail!("{} is not a target/<profile> directory", dir.display()),
    };
    let target_dir = dir.parent().context("no target directory")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    // The variables cargo set for this test process describe this package,
    // not the build: passed on, they would make the nested build differ from
    // the developer's `cargo build` and rebuild crates that read them.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "OUT_DIR"
                    | "RUST_RECURSION_COUNT"
            )
        {
            command.env_remove(key);
        }
    }
    let mut child = command
        .args(["build", "--workspace", "--bins", "--profile", &profile])
        .arg("--manifest-path")
        .arg(workspace_root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {cargo:?} build"))?;
    let stderr = child.stderr.take().context("no cargo stderr")?;
    let mut said = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let Ok(line) = line else { break };
        if line.contains("Blocking waiting for file lock") {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(());
        }
        said.push(line);
    }
    let status = child.wait().context("cannot wait for cargo build")?;
    if !status.success() {
        bail!(
            "`cargo build --workspace --bins --profile {profile}` failed ({status}):\n{}",
            said.join("\n")
        );
    }
    Ok(())
}

/// The most recently changed source of one binary: any file under the
/// `src/` of `crates` (its own crate, `proto` and `policy`). A change there
/// always makes cargo rebuild that binary, so a binary older than it is stale;
/// the other binary's sources are not its (cargo does not rebuild it for them).
fn newest_source(crates: &[&str]) -> anyhow::Result<Option<(PathBuf, std::time::SystemTime)>> {
    fn visit(
        path: &std::path::Path,
        newest: &mut Option<(PathBuf, std::time::SystemTime)>,
    ) -> std::io::Result<()> {
        let meta = fs_err::metadata(path)?;
        if meta.is_dir() {
            for entry in fs_err::read_dir(path)? {
                visit(&entry?.path(), newest)?;
            }
        } else {
            let modified = meta.modified()?;
            if newest.as_ref().is_none_or(|(_, t)| modified > *t) {
                *newest = Some((path.to_path_buf(), modified));
            }
        }
        Ok(())
    }
    let root = workspace_root();
    let mut newest = None;
    for krate in crates {
        let path = root.join(krate).join("src");
        visit(&path, &mut newest).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(newest)
}

/// What identifies the binaries under test: each one's `--version`, size,
/// modification time and SHA-256 prefix, and the checkout's commit (with
/// `-dirty` for uncommitted changes). The bench prints it with its figures.
pub fn binaries_description() -> anyhow::Result<String> {
    let dir = bin_dir()?;
    let mut text = String::new();
    let commit = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(workspace_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "unknown (not a git checkout)".into());
    let _ = writeln!(text, "sources: {} at {commit}", workspace_root().display());
    for name in ["master", "worker"] {
        let path = dir.join(name);
        let version = Command::new(&path)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        let bytes =
            fs_err::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let modified = fs_err::metadata(&path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| jiff::Timestamp::try_from(t).ok())
            .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "{name}: {} ({version}, {} bytes, built {modified}, sha256 {})",
            path.display(),
            bytes.len(),
            &hex::encode(Sha256::digest(&bytes))[..16]
        );
    }
    Ok(text)
}
