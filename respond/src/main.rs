use botline_shared::service::Service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("respond", "127.0.0.1:9103", |_| Vec::new()).await?;
    service
        .run(|settings, plumbing, shutdown| async move {
            respond::run(settings, plumbing, shutdown).await
        })
        .await
}
