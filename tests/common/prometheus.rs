//! A real Prometheus server (Debian's `prometheus` package; scripts/chart-env.sh installs it and
//! exports its path) scraping trailhose workers every second, and a client for its HTTP API.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{TempDir, free_port, http_get};

/// One scraped target: its /metrics port and its target labels (`job` among them; a target
/// label overrides the scrape config's job name).
pub struct Target {
    pub port: u16,
    pub labels: BTreeMap<String, String>,
}

pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

/// One series of an instant query: its labels and value (NaN and ±Inf as Prometheus sends them).
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Prometheus {
    /// Starts `binary` with its own storage in a temp dir, on a free loopback port, scraping
    /// `targets` every second; waits until it is ready.
    pub fn start(binary: &Path, targets: &[Target]) -> Prometheus {
        assert!(
            binary.is_file(),
            "no Prometheus server at {} (scripts/chart-env.sh installs it)",
            binary.display()
        );
        let dir = TempDir::new("prometheus");
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n",
        );
        for (i, t) in targets.iter().enumerate() {
            config += &format!(
                "  - job_name: target-{i}\n    static_configs:\n      - targets: [\"127.0.0.1:{}\"]\n        labels:\n",
                t.port
            );
            for (k, v) in &t.labels {
                config += &format!("          {k}: {}\n", yaml_str(v));
            }
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log file");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let mut prom = Prometheus { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while http_get(port, "/-/ready").is_none_or(|(s, _)| s != 200) {
            if let Ok(Some(status)) = prom.child.try_wait() {
                panic!("prometheus exited ({status}):\n{}", prom.log());
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready after 60 s:\n{}",
                prom.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prom
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    fn api(&self, path: &str) -> Result<serde_json::Value, String> {
        let (status, body) =
            http_get(self.port, path).ok_or_else(|| format!("no answer to {path}"))?;
        let v: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!(
                "{}: {}",
                v["errorType"].as_str().unwrap_or("error"),
                v["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(v["data"].clone())
    }

    /// An instant query at the current time through /api/v1/query.
    pub fn query(&self, expr: &str) -> Result<Vec<Sample>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", encode(expr)))?;
        let value = |v: &serde_json::Value| -> Result<f64, String> {
            let s = v[1].as_str().ok_or_else(|| format!("bad sample {v}"))?;
            s.parse::<f64>().map_err(|e| format!("bad value {s}: {e}"))
        };
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .ok_or("no result")?
                .iter()
                .map(|r| {
                    let labels = r["metric"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").to_owned()))
                                .collect()
                        })
                        .unwrap_or_default();
                    Ok(Sample {
                        labels,
                        value: value(&r["value"])?,
                    })
                })
                .collect(),
            Some("scalar") => Ok(vec![Sample {
                labels: BTreeMap::new(),
                value: value(&data["result"])?,
            }]),
            other => Err(format!("unexpected result type {other:?}")),
        }
    }

    /// The values of `label` on the series `selector` selects (Grafana's `label_values`).
    pub fn label_values(&self, label: &str, selector: &str) -> Result<Vec<String>, String> {
        let data = self.api(&format!(
            "/api/v1/label/{label}/values?match[]={}",
            encode(selector)
        ))?;
        Ok(data
            .as_array()
            .ok_or("not a list")?
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect())
    }

    /// The type (`counter`, `gauge`, `histogram`, ...) of every metric family scraped so far.
    pub fn metadata(&self) -> Result<BTreeMap<String, String>, String> {
        let data = self.api("/api/v1/metadata")?;
        Ok(data
            .as_object()
            .ok_or("not an object")?
            .iter()
            .filter_map(|(name, entries)| {
                Some((name.clone(), entries[0]["type"].as_str()?.to_owned()))
            })
            .collect())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes a query parameter (everything but RFC 3986's unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML).
fn yaml_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}
