use botline_shared::service::Service;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let service = Service::start("classify", "127.0.0.1:9102", |_| Vec::new()).await?;
    service
        .run(|settings, plumbing, shutdown| async move {
            classify::run_with_model(
                settings,
                classify::model_path_from_env(),
                plumbing,
                shutdown,
            )
            .await
        })
        .await
}
