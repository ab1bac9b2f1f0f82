//! End-to-end tests of build artifacts through the real binaries over TLS:
//! a build's `dist/*.tar.gz` uploaded by its agent, listed by the API and
//! the build page, downloaded by `master artifacts --get` with its checksum
//! verified, still there after a master restart; an oversize artifact fails
//! its build with the reason; uploads for another worker's build, oversize,
//! with a wrong checksum or a path escape are refused by the master itself.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use nightshift_proto::api::{ApiClient, BuildState};
use nightshift_proto::wire::{ARTIFACT_SHA256_HEADER, Outcome, artifact_upload_path};
use nightshift_tests::{DEADLINE, Farm, WorkerSpec, wait_for};
use sha2::{Digest, Sha256};

/// Max bytes per artifact file in these tests' master.toml: above axum's
/// 2 MB default body limit, so streaming past it is exercised.
const MAX_FILE: u64 = 3 << 20;

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn master_toml() -> String {
    format!(
        "max_artifact_bytes = {MAX_FILE}\nmax_build_artifact_bytes = 10000000\nartifact_retention = \"30d\"\n\
         \n[[builder]]\nname = \"dist\"\nworkers = [\"w1\"]\nartifacts = [\"dist/*.tar.gz\", \"missing/*.zip\"]\n\
         steps = [{{ name = \"pack\", command = \"rm -rf dist && mkdir -p dist/sub && printf 'hello artifact' > dist/x.tar.gz && head -c 3000000 /dev/urandom > 'dist/y z.tar.gz' && echo no > dist/notes.txt\" }}]\n\
         \n[[builder]]\nname = \"big\"\nworkers = [\"w1\"]\nartifacts = [\"dist/*.bin\"]\n\
         steps = [{{ name = \"pack\", command = \"mkdir -p dist && head -c 4000000 /dev/zero > dist/big.bin\" }}]\n\
         \n[[builder]]\nname = \"slow\"\nworkers = [\"w2\"]\nartifacts = [\"out/*\"]\n\
         steps = [{{ name = \"wait\", command = \"echo started; sleep 120\" }}]\n"
    )
}

/// A client of the master's port presenting worker `name`'s token.
fn as_worker(farm: &Farm, name: &str) -> anyhow::Result<ApiClient> {
    let token = farm.worker_spec(name)?.token.clone();
    ApiClient::new(farm.url(), token, Some(farm.tls_client()?))
}

/// A raw artifact upload; returns the status and body text.
async fn put(
    client: &ApiClient,
    id: u64,
    name: &str,
    body: &[u8],
    sha: &str,
) -> anyhow::Result<(u16, String)> {
    put_to(client, &artifact_upload_path(id, name), body, sha).await
}

/// A raw upload to `path` as given (no encoding).
async fn put_to(
    client: &ApiClient,
    path: &str,
    body: &[u8],
    sha: &str,
) -> anyhow::Result<(u16, String)> {
    let request = client
        .request("PUT", path)
        .header("content-length", body.len())
        .header(ARTIFACT_SHA256_HEADER, sha)
        .body(Full::new(Bytes::copy_from_slice(body)))?;
    let response = client.send(request).await?;
    let status = response.status().as_u16();
    let text = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&text).into_owned()))
}

/// Sends only the headers of an upload of `length` bytes (with `Expect:
/// 100-continue`, as curl does for large bodies) and returns the whole
/// answer: a cap refused from the headers never waits for the body.
async fn headers_only_put(
    farm: &Farm,
    token: &str,
    path: &str,
    length: u64,
) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", farm.url().port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1")?;
    let mut tls = tokio_rustls::TlsConnector::from(farm.tls_client()?)
        .connect(name, tcp)
        .await?;
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
         Content-Length: {length}\r\n{ARTIFACT_SHA256_HEADER}: {}\r\nExpect: 100-continue\r\n\
         Connection: close\r\n\r\n",
        "0".repeat(64)
    );
    tls.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, tls.read_to_end(&mut answer)).await?;
    // The master may close without a TLS close_notify once it has answered.
    if let Err(e) = read
        && answer.is_empty()
    {
        return Err(e.into());
    }
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_leaves_verified_downloadable_artifacts_and_the_master_enforces_its_rules()
-> anyhow::Result<()> {
    let mut farm = Farm::builder()
        .worker(WorkerSpec::new("w1"))
        .worker(WorkerSpec::new("w2"))
        .master_toml(&master_toml())
        .start()
        .await?;
    farm.start_worker("w1")?;
    farm.start_worker("w2")?;
    farm.wait_worker_ready("w1").await?;
    farm.wait_worker_ready("w2").await?;
    let api = farm.api()?;

    // A build's dist/*.tar.gz reach the master, checksummed.
    let id = api.submit("dist", Default::default()).await?.build_id;
    let build = farm.wait_build(id).await?;
    let log = api.log(id).await?.log;
    assert_eq!(
        build.outcome,
        Some(Outcome::Success),
        "{build:?}\n{log}\nmaster log:\n{}\nworker log:\n{}",
        farm.master_log(),
        farm.worker_log("w1")
    );
    assert!(
        log.contains("`missing/*.zip` matched no file"),
        "a pattern matching nothing is a warning in the log: {log}"
    );
    assert_eq!(build.steps.len(), 2, "pack, then the artifacts step");
    let dist = farm.worker_dir("w1").join("work/dist/dist");
    let x = fs_err::read(dist.join("x.tar.gz"))?;
    let y = fs_err::read(dist.join("y z.tar.gz"))?;
    let names: Vec<(&str, u64, &str)> = build
        .artifacts
        .iter()
        .map(|a| (a.name.as_str(), a.size, a.sha256.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("dist/x.tar.gz", x.len() as u64, sha256(&x).as_str()),
            ("dist/y z.tar.gz", 3_000_000, sha256(&y).as_str()),
        ]
    );
    assert_eq!(api.artifacts(id).await?.artifacts, build.artifacts);
    let stored = farm
        .data_dir()
        .join(format!("artifacts/{id}/dist/x.tar.gz"));
    assert_eq!(
        fs_err::read(&stored)?,
        x,
        "stored under data_dir/artifacts/<build>/"
    );

    // The CLI lists them and downloads one, verifying its checksum.
    let (code, out, err) = farm.master_cli(&["artifacts", &id.to_string()])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("dist/x.tar.gz") && out.contains(&sha256(&x)),
        "{out}"
    );
    let (code, out, err) = farm.master_cli(&["artifacts", &id.to_string(), "--json"])?;
    assert_eq!(code, 0, "{out}{err}");
    let listed: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(listed["artifacts"][1]["name"], "dist/y z.tar.gz", "{out}");
    let target = farm.dir.path().join("got.tar.gz");
    let target_arg = target.display().to_string();
    let (code, out, err) = farm.master_cli(&[
        "artifacts",
        &id.to_string(),
        "--get",
        "dist/y z.tar.gz",
        "-o",
        &target_arg,
    ])?;
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("verified") && out.contains(&sha256(&y)),
        "{out}"
    );
    assert_eq!(fs_err::read(&target)?, y);
    let (code, out, err) = farm.master_cli(&["artifacts", &id.to_string(), "--get", "nope"])?;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no artifact `nope`") && err.contains("dist/x.tar.gz"),
        "{err}"
    );

    // The build page links them; the link serves the file with its headers.
    let (status, page) = api.call_raw("GET", &format!("/builds/{id}"), None).await?;
    assert_eq!(status, 200);
    assert!(
        page.contains(&format!(
            "href=\"/builds/{id}/artifacts/dist/y%20z.tar.gz\""
        )),
        "{page}"
    );
    let request = api
        .request("GET", &format!("/builds/{id}/artifacts/dist/x.tar.gz"))
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = api.send(request).await?;
    assert_eq!(response.status().as_u16(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("content-length"), x.len().to_string());
    assert_eq!(header("content-type"), "application/octet-stream");
    assert_eq!(header(ARTIFACT_SHA256_HEADER), sha256(&x));
    assert!(header("content-disposition").contains("filename=\"x.tar.gz\""));
    assert_eq!(response.into_body().collect().await?.to_bytes(), x);
    // The link is behind the build page's gate (`dashboard = "login"`, the
    // default): a stranger is sent to the login page, and gets no bytes.
    let stranger = ApiClient::new(farm.url(), "not-a-token".into(), Some(farm.tls_client()?))?;
    let request = stranger
        .request("GET", &format!("/builds/{id}/artifacts/dist/x.tar.gz"))
        .body(http_body_util::Empty::<Bytes>::new())?;
    let response = stranger.send(request).await?;
    assert_eq!(response.status().as_u16(), 303);
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(location.starts_with("/login?next="), "{location}");
    let (status, _) = stranger
        .call_raw(
            "GET",
            &format!("/api/v1/builds/{id}/artifacts/dist/x.tar.gz"),
            None,
        )
        .await?;
    assert_eq!(status, 401, "the API's download needs the admin token");

    // An oversize artifact fails its build, with the reason.
    let big = api.submit("big", Default::default()).await?.build_id;
    let build = farm.wait_build(big).await?;
    assert_eq!(build.outcome, Some(Outcome::Failure), "{build:?}");
    let reason = build.reason.clone().unwrap_or_default();
    assert!(
        reason.contains("dist/big.bin")
            && reason.contains(&format!("max_artifact_bytes ({MAX_FILE})")),
        "{reason}"
    );
    assert!(api.log(big).await?.log.contains("max_artifact_bytes"));
    assert!(build.artifacts.is_empty());

    // While w2 runs a build, the master itself judges uploads for it.
    let slow = api.submit("slow", Default::default()).await?.build_id;
    farm.wait_build_state(slow, "the slow build running", |b| {
        b.state == BuildState::Running
    })
    .await?;
    wait_for("the slow build's first output", DEADLINE, || {
        let api = api.clone();
        async move { Ok(api.log(slow).await?.log.contains("started").then_some(())) }
    })
    .await?;
    let w1 = as_worker(&farm, "w1")?;
    let w2 = as_worker(&farm, "w2")?;
    let data = b"forged".as_slice();
    let (status, text) = put(&w1, slow, "out/f", data, &sha256(data)).await?;
    assert_eq!(status, 403, "another worker's build: {text}");
    assert!(text.contains("not running on worker w1"), "{text}");
    let (status, text) = put(&w1, id, "out/f", data, &sha256(data)).await?;
    assert_eq!(status, 403, "a finished build: {text}");
    let (status, text) = put(&w2, slow, "out/f", data, &sha256(b"other")).await?;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    // Refused from the headers alone: the body is never read.
    let w2_token = farm.worker_spec("w2")?.token.clone();
    let path = artifact_upload_path(slow, "out/big");
    let answer = headers_only_put(&farm, &w2_token, &path, MAX_FILE + 1).await?;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("max_artifact_bytes"), "{answer}");
    let base = format!("/api/v1/agent/builds/{slow}/artifacts");
    let (status, text) = put_to(&w2, &format!("{base}/../../escape"), data, &sha256(data)).await?;
    assert!(status == 400 || status == 404, "{status}: {text}");
    let (status, text) = put_to(&w2, &format!("{base}/out/%2E%2E/x"), data, &sha256(data)).await?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("`..`"), "{text}");
    let (status, text) = put(&w2, slow, "out/own", data, &sha256(data)).await?;
    assert_eq!(status, 201, "its own running build: {text}");
    assert!(
        !farm.data_dir().join("escape").exists() && !farm.data_dir().join("artifacts/x").exists()
    );
    let (status, metrics) = api.call_raw("GET", "/metrics", None).await?;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(
            "nightshift_master_refused_total{what=\"artifact\",reason=\"not_handed_to_it\"} 1"
        ) && metrics.contains(
            "nightshift_master_refused_total{what=\"artifact\",reason=\"unknown_or_finished\"} 1"
        ),
        "{metrics}"
    );
    api.cancel(slow, Some("done testing")).await?;
    farm.wait_build(slow).await?;

    // Restarted, the master still lists and serves them.
    farm.stop_master().await?;
    farm.start_master().await?;
    let api = farm.api()?;
    assert_eq!(api.artifacts(id).await?.artifacts.len(), 2);
    let again = farm.dir.path().join("again.tar.gz");
    let got = api.download_artifact(id, "dist/x.tar.gz", &again).await?;
    assert_eq!((got.size, got.sha256), (x.len() as u64, sha256(&x)));
    assert_eq!(fs_err::read(&again)?, x);
    Ok(())
}
