//! `origin [serve|migrate|seed-demo]`: reads the environment and hands over
//! to the library.

use anyhow::Context;
use origin::{Application, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let command = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "serve".to_owned());
    let config = Config::from_env().context("configuration")?;
    origin::telemetry::init(config.log_json);
    match command.as_str() {
        "serve" => {
            let app = Application::build(config).await.context("start-up")?;
            tracing::info!(addr = %app.local_addr(), "origin listening");
            app.run(origin::startup::shutdown_signal())
                .await
                .context("serve")?;
        }
        "migrate" => {
            let pool = origin::db::pool(&config.database_url, 1)?;
            let applied = origin::db::migrate(&pool).await?;
            tracing::info!(?applied, "migrations applied");
        }
        "seed-demo" => {
            let pool = origin::db::pool(&config.database_url, 1)?;
            origin::db::migrate(&pool).await?;
            origin::seed::seed_demo(&pool).await?;
            tracing::info!("demo users ready");
        }
        other => anyhow::bail!("unknown command {other:?}; expected serve, migrate or seed-demo"),
    }
    Ok(())
}
