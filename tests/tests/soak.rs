//! A short seeded fault soak through the real binaries: about 100 builds
//! with faults injected, every promise checked (`nightshift-soak` runs the
//! long one).

use std::time::Duration;

use nightshift_tests::soak::{SoakConfig, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_loses_duplicates_and_forges_nothing() -> anyhow::Result<()> {
    let report = run(SoakConfig {
        builds: 100,
        workers: 3,
        windowed: 2,
        seed: 20_261_130,
        master_faults: true,
        drain_deadline: Duration::from_secs(180),
        keep_dir: false,
    })
    .await?;
    eprintln!("{}", report.summary());
    // Every kind of fault took its turn, and windows opened and closed
    // with builds in them.
    assert!(report.faults.len() >= 7, "{report:?}");
    assert!(
        report.windows >= 3 && report.windowed_builds >= 1,
        "{}",
        report.summary()
    );
    assert!(
        report.is_clean(),
        "{}\n{:#?}\nthe farm's directory is kept: {:?}",
        report.summary(),
        report.violations,
        report.kept_dir
    );
    Ok(())
}
