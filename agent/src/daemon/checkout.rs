//! The checkout step: the shell script (real `git`) that brings a builder's
//! work directory to a build's exact revision, by the builder's mode —
//! `incremental` (fetch + `reset --hard`, outputs kept), `full` (also
//! `clean -ffdx`), `fresh` (everything removed, then a new clone) — and the
//! environment it runs with: the worker's own credentials from `[git]` in
//! worker.toml (never from the master), no terminal prompts.

use nightshift_proto::wire::{BuildSource, CheckoutMode, is_full_revision};

use crate::config::GitAuth;

/// `'text'` for `sh`, whatever `text` holds.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The script the checkout step runs in the build directory.
pub fn script(source: Option<&BuildSource>) -> String {
    let Some(source) = source else {
        return "echo 'nightshift: this build has no source to check out' >&2; exit 2".into();
    };
    if !is_full_revision(&source.revision) || source.repository.starts_with('-') {
        return format!(
            "echo {} >&2; exit 2",
            quote(&format!(
                "nightshift: refusing to check out revision `{}` of `{}`",
                source.revision, source.repository
            ))
        );
    }
    let depth = if source.shallow { "--depth 1" } else { "" };
    let mut s = String::from("set -eu\n");
    s.push_str(&format!(
        "repo={}\nrev={}\nbranch={}\n",
        quote(&source.repository),
        quote(&source.revision),
        quote(&source.branch)
    ));
    s.push_str(&format!(
        "echo \"nightshift: checkout of $rev${{branch:+ ($branch)}} from $repo, mode {}{}\"\n",
        source.mode.as_str(),
        if source.shallow { ", shallow" } else { "" }
    ));
    if source.mode == CheckoutMode::Fresh {
        s.push_str("find . -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +\n");
    }
    s.push_str(
        "if [ ! -d .git ]; then git init -q .; fi\n\
         if git remote get-url origin >/dev/null 2>&1; then git remote set-url origin \"$repo\"; \
         else git remote add origin \"$repo\"; fi\n",
    );
    // By id first (servers speaking protocol v2 serve any reachable
    // commit); else the branch, which must then contain the revision.
    s.push_str(&format!(
        "if ! git fetch -q --no-tags {depth} origin \"$rev\" 2>/dev/null; then\n\
         \x20 echo \"nightshift: the remote does not serve $rev by id; fetching branch $branch\"\n\
         \x20 git fetch -q --no-tags origin \"+refs/heads/$branch:refs/remotes/origin/$branch\"\n\
         fi\n\
         if ! git cat-file -e \"$rev^{{commit}}\" 2>/dev/null; then\n\
         \x20 echo \"nightshift: revision $rev is not in $repo\" >&2; exit 1\n\
         fi\n\
         git checkout -q --force --detach \"$rev\"\n\
         git reset -q --hard \"$rev\"\n"
    ));
    if source.mode == CheckoutMode::Full {
        s.push_str("git clean -q -ffdx\n");
    }
    s.push_str("git log -1 --format='nightshift: at %H %s'\n");
    s
}

/// Environment of every step: what the build builds.
pub fn source_env(source: Option<&BuildSource>) -> Vec<(&'static str, String)> {
    match source {
        None => Vec::new(),
        Some(source) => vec![
            ("NIGHTSHIFT_REPOSITORY", source.repository.clone()),
            ("NIGHTSHIFT_BRANCH", source.branch.clone()),
            ("NIGHTSHIFT_REVISION", source.revision.clone()),
        ],
    }
}

/// Extra environment of the checkout step: the worker's credentials.
pub fn auth_env(auth: &GitAuth) -> Vec<(String, String)> {
    let mut env = vec![("GIT_TERMINAL_PROMPT".to_owned(), "0".to_owned())];
    if let Some(key) = &auth.ssh_key {
        env.push((
            "GIT_SSH_COMMAND".into(),
            format!(
                "ssh -i {} -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
                quote(&key.to_string_lossy())
            ),
        ));
    }
    if let Some(file) = &auth.token_file {
        // A credential helper that reads the token when git asks for it:
        // the token itself is in no environment and no command line.
        let username = auth.username.as_deref().unwrap_or("x-access-token");
        let helper = format!(
            "!f() {{ test \"$1\" = get || exit 0; echo username={}; printf 'password=%s\\n' \"$(cat {})\"; }}; f",
            quote(username),
            quote(&file.to_string_lossy())
        );
        env.push(("GIT_CONFIG_COUNT".into(), "2".into()));
        env.push(("GIT_CONFIG_KEY_0".into(), "credential.helper".into()));
        env.push(("GIT_CONFIG_VALUE_0".into(), String::new()));
        env.push(("GIT_CONFIG_KEY_1".into(), "credential.helper".into()));
        env.push(("GIT_CONFIG_VALUE_1".into(), helper));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn git(dir: &std::path::Path, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.org")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.org")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn run(script: &str, dir: &std::path::Path) -> (bool, String) {
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    #[test]
    fn modes_keep_clean_or_remove_what_the_last_build_left() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = tmp.path().join("origin");
        fs_err::create_dir(&origin).unwrap();
        git(&origin, &["init", "-q", "-b", "main"]);
        fs_err::write(origin.join("a.txt"), "one").unwrap();
        git(&origin, &["add", "a.txt"]);
        git(&origin, &["commit", "-q", "-m", "first"]);
        let first = git(&origin, &["rev-parse", "HEAD"]);
        fs_err::write(origin.join("a.txt"), "two").unwrap();
        git(&origin, &["commit", "-q", "-am", "second"]);
        let second = git(&origin, &["rev-parse", "HEAD"]);
        let url = format!("file://{}", origin.display());

        for (mode, shallow, keeps_output) in [
            (CheckoutMode::Incremental, false, true),
            (CheckoutMode::Incremental, true, true),
            (CheckoutMode::Full, true, false),
            (CheckoutMode::Fresh, false, false),
        ] {
            let work = tmp.path().join(format!("work-{}-{shallow}", mode.as_str()));
            fs_err::create_dir(&work).unwrap();
            let source = |rev: &str| BuildSource {
                repository: url.clone(),
                branch: "main".into(),
                revision: rev.into(),
                mode,
                shallow,
            };
            let (ok, log) = run(&script(Some(&source(&first))), &work);
            assert!(ok, "{log}");
            assert!(log.contains(&format!("nightshift: at {first}")), "{log}");
            assert_eq!(fs_err::read_to_string(work.join("a.txt")).unwrap(), "one");
            fs_err::write(work.join("output.o"), "built").unwrap();
            fs_err::write(work.join("a.txt"), "dirty").unwrap();
            let (ok, log) = run(&script(Some(&source(&second))), &work);
            assert!(ok, "{mode:?}: {log}");
            assert_eq!(fs_err::read_to_string(work.join("a.txt")).unwrap(), "two");
            assert_eq!(work.join("output.o").exists(), keeps_output, "{mode:?}");
            assert_eq!(git(&work, &["rev-parse", "HEAD"]), second);
        }
    }

    #[test]
    fn a_revision_the_remote_lacks_fails_clearly() {
        let tmp = tempfile::tempdir().unwrap();
        let origin = tmp.path().join("origin");
        fs_err::create_dir(&origin).unwrap();
        git(&origin, &["init", "-q", "-b", "main"]);
        git(&origin, &["commit", "-q", "--allow-empty", "-m", "x"]);
        let work = tmp.path().join("work");
        fs_err::create_dir(&work).unwrap();
        let source = BuildSource {
            repository: format!("file://{}", origin.display()),
            branch: "main".into(),
            revision: "1".repeat(40),
            mode: CheckoutMode::Incremental,
            shallow: false,
        };
        let (ok, log) = run(&script(Some(&source)), &work);
        assert!(!ok);
        assert!(log.contains("is not in"), "{log}");
        // Injection through the revision is refused before any git runs.
        let (ok, log) = run(
            &script(Some(&BuildSource {
                revision: "$(touch pwned)".into(),
                ..source
            })),
            &work,
        );
        assert!(!ok && log.contains("refusing"), "{log}");
        assert!(!work.join("pwned").exists());
    }

    #[test]
    fn the_token_is_read_by_a_helper_not_put_in_the_environment() {
        let env = auth_env(&GitAuth {
            ssh_key: Some("/k/id ed".into()),
            token_file: Some("/k/token".into()),
            username: None,
        });
        let text = format!("{env:?}");
        assert!(text.contains("cat '/k/token'"));
        assert!(text.contains("-i '/k/id ed'"));
        assert!(
            env.iter()
                .any(|(k, v)| k == "GIT_TERMINAL_PROMPT" && v == "0")
        );
    }
}
