//! Logging. JSON lines in production, human-readable locally.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG` overrides the default level.
pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,tower_http=info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // try_init: a second call (tests) is not an error worth dying for.
    let _ = if json {
        // Each line carries its spans' fields: the request's span holds
        // `request_id`, `method` and the redacted `uri`, so every line of a
        // request can be found by its id (`span` is the innermost span,
        // `spans` all of them, outermost first).
        builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}
