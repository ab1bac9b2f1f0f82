//! The master's one use of git: `git ls-remote` to learn a branch's head
//! (for polling, timed builds and `master submit --branch`), with no prompt,
//! a timeout, and the remote's words in the error.

use std::process::Stdio;
use std::time::Duration;

use nightshift_proto::wire::is_full_revision;

/// Longest an `ls-remote` may take before it is killed.
pub const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(60);

/// The head commit of `branch` in `repo`.
pub async fn branch_head(repo: &str, branch: &str) -> Result<String, String> {
    let refname = format!("refs/heads/{branch}");
    let mut command = tokio::process::Command::new("git");
    command
        .args(["ls-remote", "--exit-code", repo, &refname])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if std::env::var_os("GIT_SSH_COMMAND").is_none() {
        command.env("GIT_SSH_COMMAND", "ssh -o BatchMode=yes");
    }
    let output = match tokio::time::timeout(LS_REMOTE_TIMEOUT, command.output()).await {
        Err(_) => {
            return Err(format!(
                "`git ls-remote {repo}` took longer than {}s",
                LS_REMOTE_TIMEOUT.as_secs()
            ));
        }
        Ok(Err(e)) => return Err(format!("cannot run git: {e}")),
        Ok(Ok(output)) => output,
    };
    if output.status.code() == Some(2) {
        return Err(format!("branch `{branch}` does not exist in {repo}"));
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message");
        return Err(format!("`git ls-remote {repo}` failed: {}", why.trim()));
    }
    parse_head(&String::from_utf8_lossy(&output.stdout), &refname)
        .ok_or_else(|| format!("branch `{branch}` does not exist in {repo}"))
}

/// The commit of exactly `refname` in `ls-remote` output.
fn parse_head(output: &str, refname: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let (sha, name) = line.split_once('\t')?;
        (name.trim() == refname && is_full_revision(sha)).then(|| sha.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exact_ref_is_taken() {
        let out = "1111111111111111111111111111111111111111\trefs/heads/main-old\n\
                   2222222222222222222222222222222222222222\trefs/heads/main\n";
        assert_eq!(
            parse_head(out, "refs/heads/main").as_deref(),
            Some("2222222222222222222222222222222222222222")
        );
        assert_eq!(parse_head(out, "refs/heads/dev"), None);
    }
}
