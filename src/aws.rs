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

/// Timeouts for a client whose calls must not hang: connecting, and each attempt (retried
/// by the client's retry policy). A streamed download's body is not covered (the SDK's
/// stalled-stream protection watches it); an upload's body is.
pub fn timeouts(attempt: std::time::Duration) -> aws_sdk_s3::config::timeout::TimeoutConfig {
    aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .operation_attempt_timeout(attempt)
        .build()
}

/// A role to assume for one client's credentials (`output.s3.role_arn`): the ARN, the
/// external id the role's trust policy may ask for, and the session name CloudTrail records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumedRole {
    pub arn: String,
    pub external_id: Option<String>,
    pub session_name: String,
}

/// `shared` with its credentials replaced by `role`'s, assumed through STS with the process's
/// own credentials (refreshed before they expire). STS is asked in `region` at its regional
/// endpoint, never at the client's endpoint (an S3-compatible store or an S3 VPC endpoint
/// does not answer AssumeRole).
pub async fn assume(shared: SdkConfig, region: Option<&str>, role: &AssumedRole) -> SdkConfig {
    let sts = config(region, None).await;
    let mut provider = aws_config::sts::AssumeRoleProvider::builder(role.arn.clone())
        .session_name(role.session_name.clone());
    if let Some(id) = &role.external_id {
        provider = provider.external_id(id.clone());
    }
    let provider = provider.configure(&sts).build().await;
    shared
        .into_builder()
        .credentials_provider(aws_sdk_s3::config::SharedCredentialsProvider::new(provider))
        .build()
}

/// Checks an IAM role ARN (`arn:<partition>:iam::<12-digit account>:role/<path/name>`), as
/// STS's AssumeRole takes it; the message says what is wrong.
pub fn check_role_arn(arn: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{arn:?} is not an IAM role ARN ({why}); expected arn:aws:iam::<12-digit account>:role/<name>"
        ))
    };
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("iam"), Some(""), Some(account), Some(resource)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return bad("arn:<partition>:iam::<account>:role/<name>");
    };
    if !partition.starts_with("aws")
        || !partition
            .bytes()
            .all(|b| b.is_ascii_alphabetic() || b == b'-')
    {
        return bad("partition");
    }
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return bad("account");
    }
    let Some(name) = resource.strip_prefix("role/") else {
        return bad("not a role");
    };
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"+=,.@_-/".contains(&b);
    if name.is_empty() || name.ends_with('/') || arn.len() > 2048 || !name.bytes().all(ok) {
        return bad("role name");
    }
    Ok(())
}

/// Checks an STS external id (2 to 1224 characters of `A-Z a-z 0-9 + = , . @ : / -` and `_`).
pub fn check_external_id(id: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"+=,.@:/-_".contains(&b);
    if (2..=1224).contains(&id.len()) && id.bytes().all(ok) {
        return Ok(());
    }
    Err("must be 2 to 1224 characters of A-Z a-z 0-9 + = , . @ : / - _".into())
}

/// Checks an STS role session name (2 to 64 characters of `A-Z a-z 0-9 + = , . @ -` and `_`).
pub fn check_session_name(name: &str) -> Result<(), String> {
    let ok = |b: u8| b.is_ascii_alphanumeric() || b"+=,.@-_".contains(&b);
    if (2..=64).contains(&name.len()) && name.bytes().all(ok) {
        return Ok(());
    }
    Err(format!(
        "{name:?} must be 2 to 64 characters of A-Z a-z 0-9 + = , . @ - _"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_arns_external_ids_and_session_names_are_checked_as_sts_takes_them() {
        for ok in [
            "arn:aws:iam::111122223333:role/AmazonSecurityLake-Provider-trailhose-us-east-1",
            "arn:aws-us-gov:iam::111122223333:role/path/to/writer",
            "arn:aws-cn:iam::111122223333:role/a+b=c,d.e@f_g-h",
        ] {
            assert_eq!(check_role_arn(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "AmazonSecurityLake-Provider",
            "arn:aws:iam::111122223333:user/alice",
            "arn:aws:iam::1111:role/r",
            "arn:aws:iam:us-east-1:111122223333:role/r",
            "arn:aws:s3:::bucket",
            "arn:gcp:iam::111122223333:role/r",
            "arn:aws:iam::111122223333:role/",
            "arn:aws:iam::111122223333:role/a b",
            "arn:aws:iam::111122223333:role/r\n",
        ] {
            let e = check_role_arn(bad).unwrap_err();
            assert!(e.contains("not an IAM role ARN"), "{bad}: {e}");
        }
        assert!(check_external_id("trailhose-ext-1").is_ok());
        assert!(check_external_id("x").is_err());
        assert!(check_external_id("has space").is_err());
        assert!(check_external_id(&"x".repeat(1225)).is_err());
        assert!(check_session_name("trailhose").is_ok());
        assert!(check_session_name("a/b").is_err());
        assert!(check_session_name(&"s".repeat(65)).is_err());
    }
}
