use botline_egress::EgressSettings;
use botline_shared::config::ProcessEnv;
use botline_shared::service::Service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("egress", "127.0.0.1:9104", |streams| {
        streams
            .all()
            .flat_map(|p| [streams.outbound(p, "web"), streams.outbound(p, "webhook")])
            .collect()
    })
    .await?;
    service
        .run(|settings, plumbing, shutdown| async move {
            let egress = EgressSettings::from_settings(&settings)?;
            tracing::info!(message = "egress settings", egress = %egress.summary());
            let stage = botline_egress::build(egress, &ProcessEnv, &plumbing, shutdown.clone())?;
            botline_egress::run(stage, plumbing, shutdown).await
        })
        .await
}
