//! The operations files, checked without a stack: the alert rules pass
//! `promtool check rules` and their unit tests (`promtool test rules`), the
//! scrape example passes `promtool check config`, and the Grafana dashboard
//! is well formed, its queries are valid PromQL, and between them the
//! dashboard and the alerts use only metrics the services export.
//!
//! promtool comes from Debian's `prometheus` package; `cargo xtask test`
//! installs it. Whether the origin really exposes those metrics is the
//! edge suite's `ops` test, which needs the stack.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, ensure};
use e2e::ops::{self, KNOWN_METRICS, REQUIRED_ALERTS};
use e2e::stack::{TempDir, workspace_root};

/// Runs promtool with `args`; an error with its output when it fails (or
/// is missing: these checks are not optional, so no skipping).
fn promtool(args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .context(
            "run promtool: `cargo xtask test` installs it, or \
             `apt-get install --no-install-recommends prometheus`",
        )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    Ok(text)
}

#[test]
fn the_alert_rules_pass_promtool_check_rules() -> anyhow::Result<()> {
    let root = workspace_root();
    let text = promtool(
        &["check", "rules", "ops/prometheus/alerts.yml"],
        root.as_path(),
    )?;
    assert!(text.contains("SUCCESS"), "{text}");
    Ok(())
}

#[test]
fn every_alert_fires_on_a_bad_series_and_stays_quiet_on_a_healthy_one() -> anyhow::Result<()> {
    let root = workspace_root();
    let text = promtool(
        &["test", "rules", "ops/prometheus/alerts.test.yml"],
        root.as_path(),
    )?;
    assert!(text.contains("SUCCESS"), "{text}");
    // Each alert has a test group that expects it firing and one that
    // expects it quiet; promtool alone would pass a file that tests none.
    let tests = std::fs::read_to_string(ops::alert_tests_path(&root)).expect("read the tests");
    for rule in ops::alert_rules(&root).expect("read the rules") {
        let mut fires = false;
        let mut quiet = false;
        for group in tests.split("\n  - name:").skip(1) {
            for case in group.split("- eval_time:").skip(1) {
                if !case.contains(&format!("alertname: {}\n", rule.name)) {
                    continue;
                }
                if case.contains("exp_alerts: []") {
                    quiet = true;
                } else if case.contains("exp_labels:") {
                    fires = true;
                }
            }
        }
        assert!(
            fires && quiet,
            "{}: a firing case {fires}, a quiet case {quiet}",
            rule.name
        );
    }
    Ok(())
}

#[test]
fn every_required_alert_exists_with_for_severity_summary_description_and_runbook()
-> anyhow::Result<()> {
    let root = workspace_root();
    let rules = ops::alert_rules(&root).expect("read the rules");
    let names: BTreeSet<&str> = rules.iter().map(|r| r.name.as_str()).collect();
    for required in REQUIRED_ALERTS {
        assert!(names.contains(required), "no alert {required}");
    }
    let text = std::fs::read_to_string(ops::alerts_path(&root)).expect("read the rules");
    for block in text.split("- alert:").skip(1) {
        let name = block.lines().next().unwrap_or_default().trim();
        for key in [
            "for:",
            "severity:",
            "summary:",
            "description:",
            "runbook_url:",
        ] {
            assert!(block.contains(key), "alert {name} has no {key}");
        }
        // The runbook is a section of docs/OPERATIONS.md that exists.
        let anchor = format!("docs/OPERATIONS.md#{}", name.to_lowercase());
        assert!(block.contains(&anchor), "alert {name}: runbook {anchor}");
    }
    let docs = std::fs::read_to_string(root.join("docs/OPERATIONS.md")).expect("read the docs");
    for name in names {
        assert!(
            docs.contains(&format!("### {name}")),
            "docs/OPERATIONS.md has no section `### {name}` for the runbook"
        );
    }
    Ok(())
}

#[test]
fn the_scrape_example_passes_promtool_check_config() -> anyhow::Result<()> {
    let root = workspace_root();
    promtool(
        &["check", "config", "prometheus.yml"],
        &root.join("ops/prometheus"),
    )?;
    Ok(())
}

#[test]
fn the_dashboard_is_well_formed_and_every_query_is_valid_promql() -> anyhow::Result<()> {
    let root = workspace_root();
    let queries = ops::dashboard_queries(&root).expect("a well-formed dashboard");
    // promtool has no offline query checker, but it parses a rule file's
    // expressions: each query becomes a recording rule, with Grafana's
    // interval variables replaced by a duration.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for q in &queries {
        let expr = q
            .expr
            .replace("$__rate_interval", "5m")
            .replace("$__interval", "1m")
            .replace("$__range", "1h");
        assert!(
            !expr.contains('$'),
            "panel {} ({:?}) uses a variable this check does not know: {}",
            q.panel_id,
            q.title,
            q.expr
        );
        let _ = write!(
            rules,
            "      - record: dashboard:panel_{}_{}\n        expr: {}\n",
            q.panel_id,
            q.ref_id,
            serde_json::to_string(&expr).expect("a JSON string is a YAML string")
        );
    }
    let dir = TempDir::new("vibe-ops-dashboard").expect("temp dir");
    std::fs::write(dir.path().join("dashboard.rules.yml"), rules).expect("write the rules");
    promtool(&["check", "rules", "dashboard.rules.yml"], dir.path())?;
    Ok(())
}

#[test]
fn the_dashboard_shows_every_metric_and_both_files_use_only_known_ones() -> anyhow::Result<()> {
    let root = workspace_root();
    let known: BTreeSet<String> = KNOWN_METRICS.iter().map(|m| (*m).to_owned()).collect();
    let used = ops::names_in_ops_files(&root).expect("read the files");
    let unknown: Vec<&String> = used.difference(&known).collect();
    assert!(
        unknown.is_empty(),
        "metrics no service exports (a typo?): {unknown:?}"
    );
    let mut shown = BTreeSet::new();
    for q in ops::dashboard_queries(&root).expect("a well-formed dashboard") {
        shown.extend(ops::metric_names(&q.expr));
    }
    let missing: Vec<&String> = known.difference(&shown).collect();
    assert!(missing.is_empty(), "metrics without a panel: {missing:?}");
    Ok(())
}
