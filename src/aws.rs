//! The one place AWS clients get their configuration. The standard chain (env, profile, IRSA
//! web identity) is loaded once per process with one HTTP client, so every client shares one
//! credential cache and one connection pool per endpoint settings; each client then overrides
//! only its region and endpoint (S3-compatible stores, tests).

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use tokio::sync::OnceCell;

static BASE: OnceCell<SdkConfig> = OnceCell::const_new();

/// The process's base configuration, loaded on first use. Its HTTP client is the SDK's
/// default (rustls with aws-lc, proxy settings from the environment), built once: it keeps
/// one connection pool per connector settings for every client made from it.
async fn base() -> &'static SdkConfig {
    BASE.get_or_init(|| async {
        let http = Builder::new().build_with_connector_fn(|settings, components| {
            let mut conn = ConnectorBuilder::default()
                .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
                .proxy_config(ProxyConfig::from_env());
            conn.set_connector_settings(settings.cloned());
            if let Some(c) = components {
                conn.set_sleep_impl(c.sleep_impl());
            }
            conn.build()
        });
        aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .load()
            .await
    })
    .await
}

/// A client's configuration: its own region and endpoint overrides (resolved by the standard
/// loader, so an explicit endpoint still beats `AWS_ENDPOINT_URL*`), with the process's one
/// credential provider, credential cache and HTTP client.
pub async fn config(region: Option<&str>, endpoint: Option<&str>) -> SdkConfig {
    let base = base().await;
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(h) = base.http_client() {
        loader = loader.http_client(h);
    }
    if let Some(c) = base.credentials_provider() {
        loader = loader.credentials_provider(c);
    }
    if let Some(c) = base.identity_cache() {
        loader = loader.identity_cache(c);
    }
    if let Some(r) = region {
        loader = loader.region(Region::new(r.to_owned()));
    }
    if let Some(e) = endpoint {
        loader = loader.endpoint_url(e);
    }
    loader.load().await
}
