//! The operations files as data: the Grafana dashboard
//! (`ops/grafana/vibe-chat.json`) and the alert rules
//! (`ops/prometheus/alerts.yml`), the metric names their PromQL uses, and
//! the names a `/metrics` text exposes.
//!
//! Two suites use this: `tests/ops.rs` checks the files themselves (no
//! stack), and the edge suite's `ops` test checks that a live origin exposes
//! every metric they name, so that a renamed metric cannot leave a panel
//! or an alert silently empty.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail, ensure};
use serde_json::Value;

/// The prefixes of Vibe Chat's own metrics. PromQL identifiers with any
/// other prefix are functions, keywords, labels or Prometheus's own series
/// (`up`), which no origin exposes.
pub const PREFIXES: &[&str] = &["chat_", "http_", "db_", "messages_"];

/// Every metric the operations files may use (docs/OPERATIONS.md lists
/// them with their types and labels): a name outside this list in a panel
/// or an alert is a typo. Histograms by their base name.
pub const KNOWN_METRICS: &[&str] = &[
    // Edge-reported, aggregated at the origin.
    "chat_websocket_connections",
    "chat_messages_total",
    "chat_message_ack_seconds",
    "chat_outbox_oldest_unflushed_seconds",
    "chat_outbox_flush_failures_total",
    "chat_errors_total",
    "chat_websocket_disconnects_total",
    "chat_edge_reporters",
    // The origin's own.
    "chat_message_persist_seconds",
    "chat_online_users",
    "chat_active_conversations",
    "chat_conversation_messages",
    "chat_db_query_seconds",
    "http_request_duration_seconds",
    "http_requests_total",
    "db_pool_max_size",
    "db_pool_size",
    "db_pool_available",
    "db_pool_waiting",
    "chat_db_replica_lag_seconds",
    "chat_db_reads_total",
    "messages_ingested_total",
];

/// Metrics that exist only with a read replica (`DATABASE_READ_URL`): the
/// edge suite's stack has none, so its live check leaves these out; the
/// origin's replica tests read them from a live `/metrics` with one.
pub const REPLICA_ONLY: &[&str] = &["chat_db_replica_lag_seconds", "chat_db_replica_up"];

/// The alerts `ops/prometheus/alerts.yml` must have.
pub const REQUIRED_ALERTS: &[&str] = &[
    "ChatOutboxStale",
    "ChatOutboxFlushFailing",
    "ChatHttp5xxRate",
    "ChatMessageAckSlow",
    "ChatDbPoolSaturated",
    "ChatDbReplicaLag",
];

/// Suffixes of a histogram's (or summary's) series.
const SERIES_SUFFIXES: &[&str] = &["_bucket", "_sum", "_count"];

pub fn dashboard_path(root: &Path) -> PathBuf {
    root.join("ops/grafana/vibe-chat.json")
}

pub fn alerts_path(root: &Path) -> PathBuf {
    root.join("ops/prometheus/alerts.yml")
}

pub fn alert_tests_path(root: &Path) -> PathBuf {
    root.join("ops/prometheus/alerts.test.yml")
}

/// One query of a dashboard panel.
#[derive(Debug, Clone)]
pub struct PanelQuery {
    pub panel_id: i64,
    pub title: String,
    pub ref_id: String,
    pub expr: String,
}

/// Reads the dashboard and checks its shape: it parses, it has a
/// Prometheus datasource variable that every panel uses, panel ids are
/// unique, and every panel that is not a row has at least one target with
/// a PromQL expression. Returns every query.
pub fn dashboard_queries(root: &Path) -> anyhow::Result<Vec<PanelQuery>> {
    let path = dashboard_path(root);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let dashboard: Value =
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    check_dashboard(&dashboard)
}

/// [`dashboard_queries`] for a parsed dashboard.
pub fn check_dashboard(dashboard: &Value) -> anyhow::Result<Vec<PanelQuery>> {
    ensure!(
        dashboard["title"].as_str().is_some_and(|t| !t.is_empty()),
        "the dashboard has no title"
    );
    ensure!(
        dashboard["uid"].as_str().is_some_and(|t| !t.is_empty()),
        "the dashboard has no uid (an import would duplicate it)"
    );
    // Imported anywhere, it asks which Prometheus to use instead of
    // hard-coding a datasource uid that exists on one Grafana only.
    let variable = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .context("the dashboard has no Prometheus datasource variable")?;
    let var_name = variable["name"]
        .as_str()
        .context("the datasource variable has no name")?;
    let datasource_ref = format!("${{{var_name}}}");

    let mut panels = Vec::new();
    for panel in dashboard["panels"]
        .as_array()
        .context("the dashboard has no panels")?
    {
        panels.push(panel);
        // A collapsed row keeps its panels inside it.
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)").to_owned();
        let id = panel["id"]
            .as_i64()
            .with_context(|| format!("panel {title:?} has no numeric id"))?;
        ensure!(ids.insert(id), "panel id {id} is used twice ({title:?})");
        if panel["type"] == "row" {
            continue;
        }
        ensure!(
            panel["datasource"]["uid"] == datasource_ref.as_str(),
            "panel {title:?} does not use the datasource variable {datasource_ref}"
        );
        let targets = panel["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .with_context(|| format!("panel {title:?} has no targets"))?;
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .map(str::trim)
                .filter(|e| !e.is_empty())
                .with_context(|| format!("a target of panel {title:?} has no expr"))?;
            queries.push(PanelQuery {
                panel_id: id,
                title: title.clone(),
                ref_id: target["refId"].as_str().unwrap_or("?").to_owned(),
                expr: expr.to_owned(),
            });
        }
    }
    ensure!(!queries.is_empty(), "the dashboard has no queries");
    Ok(queries)
}

/// An alert rule: its name and expression.
#[derive(Debug, Clone)]
pub struct AlertRule {
    pub name: String,
    pub expr: String,
}

/// The alerts of `ops/prometheus/alerts.yml` with their expressions.
pub fn alert_rules(root: &Path) -> anyhow::Result<Vec<AlertRule>> {
    let path = alerts_path(root);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    parse_alert_rules(&text)
}

/// A reader for exactly the YAML the rule file uses (`- alert: Name`, then
/// `expr:` inline or as a `|`/`>` block), to keep a YAML parser out of the
/// dependencies. `promtool check rules` validates the file itself; this
/// only has to find the expressions, and fails rather than guess.
pub fn parse_alert_rules(text: &str) -> anyhow::Result<Vec<AlertRule>> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules = Vec::new();
    let mut current: Option<String> = None;
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        if let Some(name) = trimmed.strip_prefix("- alert:") {
            if let Some(previous) = current.take() {
                bail!("alert {previous} has no expr");
            }
            current = Some(unquote(name.trim()).to_owned());
        } else if let Some(value) = trimmed.strip_prefix("expr:") {
            let name = current
                .take()
                .with_context(|| format!("line {}: an expr outside an alert", i + 1))?;
            let value = value.trim();
            let expr = if value.starts_with('|') || value.starts_with('>') {
                let mut block = Vec::new();
                while i + 1 < lines.len() {
                    let next = lines[i + 1];
                    let next_indent = next.len() - next.trim_start().len();
                    if !next.trim().is_empty() && next_indent <= indent {
                        break;
                    }
                    block.push(next.trim());
                    i += 1;
                }
                block.join("\n").trim().to_owned()
            } else {
                unquote(value).to_owned()
            };
            ensure!(!expr.is_empty(), "alert {name} has an empty expr");
            rules.push(AlertRule { name, expr });
        }
        i += 1;
    }
    if let Some(name) = current {
        bail!("alert {name} has no expr");
    }
    Ok(rules)
}

fn unquote(s: &str) -> &str {
    let s = s.trim();
    for q in ['"', '\''] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

/// The Vibe Chat metrics a PromQL expression reads: identifiers with one of
/// the [`PREFIXES`], outside string literals, with a histogram's
/// `_bucket`/`_sum`/`_count` taken off.
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            // A label value (a route, a status pattern) is not a metric.
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' && c != '`' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            // `$__rate_interval` and other Grafana variables.
            let after_dollar = start > 0 && chars[start - 1] == '$';
            let word: String = chars[start..i].iter().collect();
            if !after_dollar && PREFIXES.iter().any(|p| word.starts_with(p)) {
                names.insert(base_name(&word).to_owned());
            }
        } else {
            i += 1;
        }
    }
    names
}

/// A series name without a histogram's suffix.
pub fn base_name(name: &str) -> &str {
    SERIES_SUFFIXES
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// Every Vibe Chat metric the dashboard and the alert rules read.
pub fn names_in_ops_files(root: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut names = BTreeSet::new();
    for q in dashboard_queries(root)? {
        names.extend(metric_names(&q.expr));
    }
    for rule in alert_rules(root)? {
        names.extend(metric_names(&rule.expr));
    }
    Ok(names)
}

/// The metric names a Prometheus text exposition has samples for, each
/// both as written and without a histogram's suffix (comments and `# TYPE`
/// lines do not count: a metric described but never recorded has no data).
pub fn exposed_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        names.insert(name.to_owned());
        names.insert(base_name(name).to_owned());
    }
    names
}

/// The value of one series, written exactly as exposed (`name{labels}`),
/// in a Prometheus text exposition; 0 when absent.
pub fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_read_whole_never_by_its_prefix() {
        let text = "# TYPE x counter\nx_total{a=\"b\"} 3\nx_total{a=\"bc\"} 5\n";
        assert!((sample(text, "x_total{a=\"b\"}") - 3.0).abs() < f64::EPSILON);
        assert!((sample(text, "x_total{a=\"bc\"}") - 5.0).abs() < f64::EPSILON);
        assert!(sample(text, "x_total").abs() < f64::EPSILON, "absent is 0");
    }

    #[test]
    fn names_come_from_identifiers_not_strings_functions_or_variables() {
        let names = metric_names(
            r#"histogram_quantile(0.99, sum by (le, route) (rate(http_request_duration_seconds_bucket{route="/chat_x", status=~"5.."}[$__rate_interval]))) / on() max(db_pool_size) and up{job="chat_origin"}"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["db_pool_size", "http_request_duration_seconds"]
        );
    }

    #[test]
    fn alert_rules_are_read_inline_and_as_blocks() {
        let rules = parse_alert_rules(
            "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: max(chat_a) > 1\n        for: 1m\n      - alert: \"B\"\n        expr: |\n          sum(rate(chat_b_total[5m]))\n            > 0\n        labels:\n          severity: warning\n",
        )
        .expect("parses");
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].name, "A");
        assert_eq!(rules[0].expr, "max(chat_a) > 1");
        assert_eq!(rules[1].name, "B");
        assert_eq!(rules[1].expr, "sum(rate(chat_b_total[5m]))\n> 0");
        assert!(parse_alert_rules("      - alert: C\n        for: 1m\n").is_err());
    }

    #[test]
    fn exposition_names_count_samples_only() {
        let text = "# HELP chat_a help\n# TYPE chat_a gauge\n# TYPE chat_gone counter\nchat_a 1\nchat_h_bucket{le=\"0.1\"} 3\nchat_h_sum 0.2\nchat_h_count 3\n";
        let names = exposed_names(text);
        assert!(names.contains("chat_a") && names.contains("chat_h"));
        assert!(!names.contains("chat_gone"));
    }
}
