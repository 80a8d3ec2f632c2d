//! The API client: where the API is, the token, one call, and printing the answer.

use std::path::PathBuf;

use crate::cli::{tokio_util_reader, Progress};
use anyhow::Context;
use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Where the API is and how to authenticate: flags, then `ALLOD_URL`,
/// `ALLOD_TOKEN`, `ALLOD_CA`, then the config file.
#[derive(Args, Debug, Clone)]
pub struct ApiArgs {
    #[arg(long, env = "ALLOD_URL")]
    pub url: Option<String>,
    #[arg(long, env = "ALLOD_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the cluster CA.
    #[arg(long, env = "ALLOD_CA")]
    pub ca: Option<PathBuf>,
    /// Take URL, token and CA from a local node's data directory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// CLI config file (default: $XDG_CONFIG_HOME/allod/config.json or ~/.config/allod/config.json).
    #[arg(long, env = "ALLOD_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// The CLI config file.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CliConfig {
    pub url: Option<String>,
    pub token: Option<String>,
    pub ca: Option<PathBuf>,
}

pub fn parse_duration_secs(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration; write e.g. 90s, 30m, 1h or 2d"))?;
    let scale = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => {
            return Err(format!(
                "unknown unit {unit:?} in {text:?}; use s, m, h or d"
            ))
        }
    };
    if value == 0 {
        return Err("the duration must be more than zero".into());
    }
    Ok(value * scale)
}

pub(super) fn default_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("allod/config.json"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config/allod/config.json"))
}

/// A resolved API endpoint.
pub struct ApiClient {
    pub url: String,
    pub token: String,
    pub ca_pem: String,
    http: reqwest::Client,
}

impl ApiArgs {
    pub fn resolve(&self) -> anyhow::Result<ApiClient> {
        let (mut url, mut token, mut ca) = (self.url.clone(), self.token.clone(), self.ca.clone());
        if let Some(dir) = &self.data_dir {
            let dd = crate::cluster::paths::DataDir::new(dir);
            if url.is_none() {
                let text = std::fs::read_to_string(dd.node_config()).with_context(|| {
                    format!(
                        "{} is not a configured node's data directory",
                        dir.display()
                    )
                })?;
                let config: crate::cluster::paths::NodeConfig = serde_json::from_str(&text)?;
                url = Some(format!("https://{}", config.api_addr));
            }
            if token.is_none() {
                token = Some(
                    std::fs::read_to_string(dd.admin_token())
                        .with_context(|| format!("cannot read {}", dd.admin_token().display()))?
                        .trim()
                        .to_string(),
                );
            }
            ca = ca.or(Some(dd.ca_cert()));
        }
        let config_path = self.config.clone().or_else(default_config_path);
        if url.is_none() || token.is_none() || ca.is_none() {
            if let Some(path) = config_path.filter(|p| p.exists()) {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("cannot read {}", path.display()))?;
                let config: CliConfig = serde_json::from_str(&text).with_context(|| {
                    format!(
                        "{} is not a valid CLI config (expected {{\"url\",\"token\",\"ca\"}})",
                        path.display()
                    )
                })?;
                url = url.or(config.url);
                token = token.or(config.token);
                ca = ca.or(config.ca);
            }
        }
        let url = url
            .context("no API URL: pass --url, set ALLOD_URL, or write it to the CLI config file")?;
        let token = token.context(
            "no API token: pass --token, set ALLOD_TOKEN, or write it to the CLI config file",
        )?;
        let ca = ca.context(
            "no CA certificate: pass --ca FILE, set ALLOD_CA, or write it to the CLI config file",
        )?;
        let ca_pem = std::fs::read_to_string(&ca)
            .with_context(|| format!("cannot read the CA certificate {}", ca.display()))?;
        let http = reqwest::Client::builder()
            .use_preconfigured_tls(crate::cluster::pki::ca_client_config(&ca_pem)?)
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(ApiClient {
            url: url.trim_end_matches('/').to_string(),
            token: token.trim().to_string(),
            ca_pem,
            http,
        })
    }
}

impl ApiClient {
    /// Streams a file as the body of a POST, with a progress bar.
    pub async fn upload(
        &self,
        path: &str,
        file: &std::path::Path,
        len: u64,
    ) -> anyhow::Result<serde_json::Value> {
        use futures_util::StreamExt;
        let f = tokio::fs::File::open(file)
            .await
            .with_context(|| format!("cannot open {}", file.display()))?;
        let progress = std::sync::Arc::new(std::sync::Mutex::new(Progress::new("uploading", len)));
        let p = progress.clone();
        let stream = tokio_util_reader(f).map(move |chunk| {
            if let Ok(c) = &chunk {
                p.lock().expect("progress").add(c.len() as u64);
            }
            chunk
        });
        let response = self
            .http
            .post(format!("{}{}", self.url, path))
            .bearer_auth(&self.token)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::CONTENT_LENGTH, len)
            .timeout(std::time::Duration::from_secs(7 * 24 * 3600))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.url))?;
        progress.lock().expect("progress").finish();
        if len > 0 {
            eprintln!("uploaded; the server is storing the image...");
        }
        answer(response).await
    }

    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let mut request = self
            .http
            .request(method, format!("{}{}", self.url, path))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the API at {}", self.url))?;
        answer(response).await
    }
}

/// An API answer as JSON (`null` when empty), or its error's message.
pub(super) async fn answer(response: reqwest::Response) -> anyhow::Result<serde_json::Value> {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("{} (HTTP {})", error_message(&text), status.as_u16());
    }
    if text.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_str(&text).context("the API's answer is not JSON")
}

/// The `error.message` of an API error body, or the body itself.
pub fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let text: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = widths[i]))
            .collect();
        println!("{}", text.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

pub fn text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// A request type of `api_types` as the body of [`ApiClient::call`].
pub fn body<T: Serialize>(request: &T) -> Option<serde_json::Value> {
    Some(serde_json::to_value(request).expect("request types serialise"))
}

/// One API call of a command: finds the API, sends `body` (a request type
/// of `api_types` made into JSON by [`body`], never hand-written JSON), and
/// prints the answer — as JSON with `--output json`, else with `table` —
/// unless it is empty.
pub async fn request(
    api: &ApiArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
    table: impl FnOnce(&serde_json::Value),
) -> anyhow::Result<serde_json::Value> {
    let client = api.resolve()?;
    let answer = client.call(method, path, body).await?;
    if !answer.is_null() {
        emit(api.output, &answer, table);
    }
    Ok(answer)
}

pub fn emit(output: Output, value: &serde_json::Value, table: impl FnOnce(&serde_json::Value)) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("JSON values print")
        ),
        Output::Table => table(value),
    }
}
