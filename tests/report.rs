//! `vmrepo report --html`: a self-contained page, rendered by a real browser (Debian's
//! Chromium, headless) to check that its charts lay out and its numbers are there.

mod common;
use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// Runs headless Chromium on `page` with `args`; returns its standard output.
fn chromium(page: &Path, profile: &Path, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("run chromium (apt-get install chromium)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_report_renders_its_charts_numbers_and_the_last_run_in_a_browser() {
    let t = tempfile::tempdir().unwrap();
    let img = t.path().join("d.img");
    sparse_image(&img, 8 << 20, &[(0, 4 << 20, 1)]);
    let repo = init_repo(t.path());
    for (day, seed) in [(1, 10), (2, 11), (3, 12)] {
        overwrite(&img, 1 << 20, 256 << 10, seed);
        ingest_at(&repo, &img, "web<01>", &format!("2026-11-0{day}T01:00:00Z"));
    }
    // A job run (one VM) gives the status file the report shows.
    let ds = t.path().join("ds1");
    make_vm(&ds, "db01", &[(4 << 20, vec![(0, 1 << 20, 2)])]);
    let status = t.path().join("status.json");
    let job = t.path().join("job.toml");
    fs::write(
        &job,
        format!(
            "repository = \"{}\"\nvms = [\"{}/*\"]\nstatus_file = \"{}\"\n[check]\nread_data_subset = \"all\"\n",
            repo.display(),
            ds.display(),
            status.display()
        ),
    )
    .unwrap();
    vmrepo([s("run"), p(&job)]).ok();

    let page = t.path().join("report.html");
    let r = vmrepo([
        s("report"),
        p(&repo),
        s("--html"),
        p(&page),
        s("--status"),
        p(&status),
    ]);
    assert!(r.ok().stdout.contains("4 generation(s)"), "{}", r.stdout);
    let html = fs::read_to_string(&page).unwrap();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the page fetches nothing"
    );
    assert!(html.contains("web&lt;01&gt;"), "VM names are escaped");

    let profile = t.path().join("chromium-profile");
    let dom = chromium(&page, &profile, &["--dump-dom"]);
    assert!(dom.contains("data-charts-rendered=\"4/4\""), "{dom}");
    assert!(
        dom.contains("4 generation(s) of 2 VM(s), 2026-11-01 to "),
        "{dom}"
    );
    assert!(dom.contains("id=\"last-run\""), "{dom}");
    assert!(dom.contains("Check: ok"), "{dom}");
    assert!(dom.contains("db01"), "{dom}");
    let shot = t.path().join("report.png");
    chromium(
        &page,
        &profile,
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1000,1800",
        ],
    );
    let png = fs::read(&shot).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(
        png.len() > 20_000,
        "a screenshot of {} bytes is nearly blank",
        png.len()
    );

    // A status file that is not one is refused, naming it.
    fs::write(&status, "not json").unwrap();
    let r = vmrepo([
        s("report"),
        p(&repo),
        s("--html"),
        p(&page),
        s("--status"),
        p(&status),
    ]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is not a vmrepo run status file"),
        "{}",
        r.stderr
    );
}
