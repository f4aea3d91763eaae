//! A deterministic generator of realistic CloudTrail delivery files, for the benchmark and for
//! tests that need volume: varied services and identities, IPv4/IPv6/service source addresses
//! that repeat the way real ones do, nested request parameters, about 1–2 KB per event.

use std::fmt::Write;

use crate::clock::Utc;

/// splitmix64: tiny, fast, and the same sequence on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Skewed towards small values: a few addresses and principals do most of the calls.
    pub fn skewed(&mut self, n: u64) -> u64 {
        let a = self.below(n);
        let b = self.below(n);
        a.min(b).min(self.below(n))
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }

    fn hex(&mut self, out: &mut String, n: usize) {
        for _ in 0..n {
            let _ = write!(out, "{:x}", self.below(16));
        }
    }

    fn uuid(&mut self, out: &mut String) {
        self.hex(out, 8);
        out.push('-');
        self.hex(out, 4);
        out.push_str("-4");
        self.hex(out, 3);
        out.push('-');
        self.hex(out, 4);
        out.push('-');
        self.hex(out, 12);
    }
}

const REGIONS: &[&str] = &[
    "us-east-1",
    "us-west-2",
    "eu-west-1",
    "eu-central-1",
    "ap-northeast-1",
];
pub const ACCOUNTS: &[&str] = &["123456789012", "210987654321", "555555555555"];
const USERS: &[&str] = &[
    "alice",
    "bob",
    "carol",
    "deploy-bot",
    "john.smith",
    "émilie",
    "terraform",
];
const ROLES: &[&str] = &[
    "Admin",
    "ReadOnly",
    "ci-deployer",
    "lambda-exec",
    "OrganizationAccountAccessRole",
];
const AGENTS: &[&str] = &[
    "aws-cli/2.15.30 Python/3.11.8 Linux/6.1.0 exe/x86_64.amzn.2 prompt/off command/s3.cp",
    "Boto3/1.34.64 md/Botocore#1.34.64 ua/2.0 os/linux#6.1.0 md/arch#x86_64 lang/python#3.11.8 cfg/retry-mode#legacy",
    "aws-sdk-go-v2/1.25.3 os/linux lang/go#1.22.1 md/GOOS#linux md/GOARCH#amd64 api/ec2#1.150.1",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/122.0 Safari/537.36",
    "console.amazonaws.com",
    "[Terraform/1.7.5 (+https://www.terraform.io) terraform-provider-aws/5.41.0]",
];
const SERVICE_SOURCES: &[&str] = &[
    "AWS Internal",
    "lambda.amazonaws.com",
    "cloudformation.amazonaws.com",
    "autoscaling.amazonaws.com",
    "s3.amazonaws.com",
];

/// Source addresses with realistic repetition. Most public IPv4s fall in ranges the demo
/// GeoIP database covers (3.0.0.0/8 and 52.0.0.0/8), a few in ranges it does not know.
pub struct AddressPool {
    addrs: Vec<String>,
}

impl AddressPool {
    pub fn new(rng: &mut Rng, size: usize) -> AddressPool {
        let mut addrs = Vec::with_capacity(size);
        for i in 0..size {
            let a = match i % 10 {
                0..=5 => {
                    let first = if rng.below(2) == 0 { 3 } else { 52 };
                    format!(
                        "{first}.{}.{}.{}",
                        rng.below(256),
                        rng.below(256),
                        1 + rng.below(254)
                    )
                }
                6 => format!("2001:db8:1::{:x}", 1 + rng.below(0xfffe)),
                7 => format!(
                    "2a05:d018:{:x}:{:x}::{:x}",
                    rng.below(0xffff),
                    rng.below(0xffff),
                    1 + rng.below(0xffff)
                ),
                8 => format!("198.51.100.{}", 1 + rng.below(254)),
                _ => SERVICE_SOURCES[i / 10 % SERVICE_SOURCES.len()].to_owned(),
            };
            addrs.push(a);
        }
        AddressPool { addrs }
    }

    fn pick(&self, rng: &mut Rng) -> &str {
        &self.addrs[rng.skewed(self.addrs.len() as u64) as usize]
    }
}

/// Writes events for one delivery file.
pub struct Generator {
    rng: Rng,
    pool: AddressPool,
    /// Unix seconds of the next event.
    clock: i64,
}

impl Generator {
    pub fn new(seed: u64) -> Generator {
        let mut rng = Rng::new(seed);
        let pool = AddressPool::new(&mut rng, 4000);
        Generator {
            rng,
            pool,
            clock: 1_710_770_400, // 2024-03-18T14:00:00Z
        }
    }

    /// A whole delivery file (uncompressed JSON) of about `bytes` bytes.
    pub fn delivery_file(&mut self, bytes: usize) -> Vec<u8> {
        let mut out = String::with_capacity(bytes + 4096);
        out.push_str("{\"Records\":[");
        let mut first = true;
        while out.len() < bytes {
            if !first {
                out.push(',');
            }
            first = false;
            self.event(&mut out);
        }
        out.push_str("]}");
        out.into_bytes()
    }

    /// Appends one event object.
    pub fn event(&mut self, out: &mut String) {
        // Events are a few hundred milliseconds apart on average: files span minutes and the
        // benchmark's output spreads over a handful of hourly partitions.
        self.clock += (self.rng.below(100) == 0) as i64;
        let r = &mut self.rng;
        let time = Utc::from_unix(self.clock).rfc3339();
        let region = r.pick(REGIONS);
        let account = ACCOUNTS[r.skewed(ACCOUNTS.len() as u64) as usize];
        let user = r.pick(USERS);
        let agent = r.pick(AGENTS);
        let source_ip = self.pool.pick(r).to_owned();
        let _ = write!(out, r#"{{"eventVersion":"1.09","userIdentity":"#);
        match r.below(4) {
            0 => {
                let _ = write!(
                    out,
                    r#"{{"type":"IAMUser","principalId":"AIDA{}","arn":"arn:aws:iam::{account}:user/{user}","accountId":"{account}","accessKeyId":"AKIA"#,
                    r.below(1 << 40)
                );
                r.hex(out, 12);
                let _ = write!(out, r#"","userName":"{user}"}}"#);
            }
            1 => {
                let role = r.pick(ROLES);
                let _ = write!(
                    out,
                    r#"{{"type":"AssumedRole","principalId":"AROA{0}:{user}","arn":"arn:aws:sts::{account}:assumed-role/{role}/{user}","accountId":"{account}","accessKeyId":"ASIA"#,
                    r.below(1 << 40)
                );
                r.hex(out, 12);
                let _ = write!(
                    out,
                    r#"","sessionContext":{{"sessionIssuer":{{"type":"Role","principalId":"AROA{0}","arn":"arn:aws:iam::{account}:role/{role}","accountId":"{account}","userName":"{role}"}},"webIdFederationData":{{}},"attributes":{{"creationDate":"{time}","mfaAuthenticated":"{1}"}}}}}}"#,
                    r.below(1 << 40),
                    r.below(2) == 0
                );
            }
            2 => {
                let _ = write!(
                    out,
                    r#"{{"type":"AWSService","invokedBy":"{}"}}"#,
                    r.pick(&SERVICE_SOURCES[1..])
                );
            }
            _ => {
                let _ = write!(
                    out,
                    r#"{{"type":"Root","principalId":"{account}","arn":"arn:aws:iam::{account}:root","accountId":"{account}","accessKeyId":""}}"#
                );
            }
        }
        let (source, name, read_only, category) = match r.below(8) {
            0..=2 => (
                "s3.amazonaws.com",
                r.pick(&["GetObject", "PutObject", "HeadObject", "ListObjects"]),
                true,
                "Data",
            ),
            3 => (
                "ec2.amazonaws.com",
                r.pick(&["DescribeInstances", "RunInstances", "TerminateInstances"]),
                false,
                "Management",
            ),
            4 => (
                "iam.amazonaws.com",
                r.pick(&["CreateUser", "AttachRolePolicy", "GetRole", "ListPolicies"]),
                false,
                "Management",
            ),
            5 => ("sts.amazonaws.com", "AssumeRole", true, "Management"),
            6 => (
                "kms.amazonaws.com",
                r.pick(&["Decrypt", "GenerateDataKey"]),
                true,
                "Management",
            ),
            _ => ("signin.amazonaws.com", "ConsoleLogin", false, "Management"),
        };
        let _ = write!(
            out,
            r#","eventTime":"{time}","eventSource":"{source}","eventName":"{name}","awsRegion":"{region}","sourceIPAddress":"{source_ip}","userAgent":"{agent}","#
        );
        if r.below(20) == 0 {
            out.push_str(r#""errorCode":"AccessDenied","errorMessage":"User is not authorized to perform this operation with \"quotes\" and unicode ✓","#);
        }
        out.push_str(r#""requestParameters":"#);
        match source {
            "s3.amazonaws.com" => {
                let _ = write!(
                    out,
                    r#"{{"bucketName":"data-lake-{account}","Host":"data-lake-{account}.s3.{region}.amazonaws.com","key":"raw/year=2024/part-{}.parquet","x-amz-server-side-encryption":"aws:kms"}},"responseElements":null,"additionalEventData":{{"SignatureVersion":"SigV4","CipherSuite":"TLS_AES_128_GCM_SHA256","bytesTransferredIn":0,"AuthenticationMethod":"AuthHeader","x-amz-id-2":""#,
                    r.below(100_000)
                );
                r.hex(out, 40);
                let _ = write!(
                    out,
                    r#"","bytesTransferredOut":{}}},"resources":[{{"type":"AWS::S3::Object","ARN":"arn:aws:s3:::data-lake-{account}/raw/x"}},{{"accountId":"{account}","type":"AWS::S3::Bucket","ARN":"arn:aws:s3:::data-lake-{account}"}}]"#,
                    r.below(1 << 24)
                );
            }
            "ec2.amazonaws.com" => {
                out.push_str(r#"{"instancesSet":{"items":["#);
                for i in 0..1 + r.below(4) {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(r#"{"instanceId":"i-0"#);
                    r.hex(out, 16);
                    out.push_str(r#""}"#);
                }
                let _ = write!(
                    out,
                    r#"]}},"filterSet":{{"items":[{{"name":"tag:env","valueSet":{{"items":[{{"value":"prod"}}]}}}}]}}}},"responseElements":null"#
                );
            }
            "iam.amazonaws.com" => {
                let _ = write!(
                    out,
                    r#"{{"userName":"{user}","policyArn":"arn:aws:iam::aws:policy/AdministratorAccess","tags":[{{"key":"owner","value":"{user}"}}]}},"responseElements":{{"user":{{"path":"/","userName":"{user}","userId":"AIDA{}","arn":"arn:aws:iam::{account}:user/{user}","createDate":"{time}"}}}}"#,
                    r.below(1 << 40)
                );
            }
            "sts.amazonaws.com" => {
                let _ = write!(
                    out,
                    r#"{{"roleArn":"arn:aws:iam::{account}:role/{0}","roleSessionName":"{user}","durationSeconds":3600}},"responseElements":{{"credentials":{{"accessKeyId":"ASIA"#,
                    r.pick(ROLES)
                );
                r.hex(out, 16);
                let _ = write!(out, r#"","sessionToken":""#);
                r.hex(out, 200);
                let _ = write!(
                    out,
                    r#"","expiration":"{time}"}},"assumedRoleUser":{{"assumedRoleId":"AROA:{user}","arn":"arn:aws:sts::{account}:assumed-role/x/{user}"}}}}"#
                );
            }
            "kms.amazonaws.com" => {
                let _ = write!(
                    out,
                    r#"{{"encryptionAlgorithm":"SYMMETRIC_DEFAULT","encryptionContext":{{"aws:lambda:FunctionArn":"arn:aws:lambda:{region}:{account}:function:handler"}}}},"responseElements":null,"resources":[{{"accountId":"{account}","type":"AWS::KMS::Key","ARN":"arn:aws:kms:{region}:{account}:key/"#
                );
                r.uuid(out);
                out.push_str(r#""}]"#);
            }
            _ => {
                let _ = write!(
                    out,
                    r#"null,"responseElements":{{"ConsoleLogin":"{0}"}},"additionalEventData":{{"LoginTo":"https://console.aws.amazon.com/console/home","MobileVersion":"No","MFAUsed":"{1}"}}"#,
                    if r.below(10) == 0 {
                        "Failure"
                    } else {
                        "Success"
                    },
                    if r.below(2) == 0 { "Yes" } else { "No" }
                );
            }
        }
        out.push_str(r#","requestID":""#);
        r.uuid(out);
        out.push_str(r#"","eventID":""#);
        r.uuid(out);
        let _ = write!(
            out,
            r#"","readOnly":{read_only},"eventType":"{0}","managementEvent":{1},"recipientAccountId":"{account}","eventCategory":"{category}","tlsDetails":{{"tlsVersion":"TLSv1.3","cipherSuite":"TLS_AES_128_GCM_SHA256","clientProvidedHostHeader":"{source}"}}}}"#,
            if source == "signin.amazonaws.com" {
                "AwsConsoleSignIn"
            } else {
                "AwsApiCall"
            },
            category == "Management"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_valid_deterministic_and_realistically_sized() {
        let a = Generator::new(7).delivery_file(200_000);
        let b = Generator::new(7).delivery_file(200_000);
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_slice(&a).unwrap();
        let records = v["Records"].as_array().unwrap();
        let avg = a.len() / records.len();
        assert!((700..2500).contains(&avg), "average event size {avg}");
        let mut ids = std::collections::HashSet::new();
        for r in records {
            assert!(r["eventTime"].is_string() && r["sourceIPAddress"].is_string());
            assert!(ids.insert(r["eventID"].as_str().unwrap().to_owned()));
        }
    }
}
