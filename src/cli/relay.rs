//! The commands that run or look after the relay itself: `run`, `check`,
//! `repair`, `keygen`; with the process set-up they need (logging, the
//! umask, the runtime, signals).

use std::path::PathBuf;
use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use super::{CliLogFormat, EXIT_CONFIG};
use crate::config::{Config, LogFormat};

/// `switchboard check`: validates, prints the configuration (secrets
/// masked) and what it means, warns.
pub fn check(config: PathBuf) -> ExitCode {
    match Config::load_raw(&config).and_then(|raw| {
        let printed = format!(
            "# store encryption: {}\n# delivered messages: {}\n{}",
            raw.encryption_summary(),
            raw.retention_summary(),
            raw.to_masked_toml()
        );
        let mut warnings = raw.warnings();
        warnings.extend(crate::config::permission_warnings(&raw, &config));
        raw.validate(&config).map(|_| (printed, warnings))
    }) {
        Ok((printed, warnings)) => {
            for w in &warnings {
                eprintln!("warning: {w}");
            }
            println!("# {}: valid", config.display());
            print!("{printed}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `switchboard keygen`.
pub fn keygen(ed25519: bool) -> ExitCode {
    if ed25519 {
        let (secret, public) = crate::delivery::signing::new_ed25519_pair();
        println!("# for the relay ([destinations.NAME.signing] secrets):\n{secret}");
        println!("# for the receiver (verifies v1a signatures):\n{public}");
    } else {
        println!("{}", crate::delivery::signing::new_hmac_secret());
    }
    ExitCode::SUCCESS
}

/// `switchboard repair`.
pub fn repair(config: PathBuf) -> ExitCode {
    let config = match super::load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    private_files();
    init_logging(LogFormat::Human, "info");
    let done = super::block_on(true, crate::repair(&config));
    match done {
        Ok(lines) => {
            println!("# store {}: opens", config.store.path.display());
            for l in lines {
                println!("{l}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `switchboard run`.
pub fn run(path: PathBuf, log_format: Option<CliLogFormat>) -> ExitCode {
    let loaded = Config::load_raw(&path).and_then(|raw| {
        let warnings = crate::config::permission_warnings(&raw, &path);
        raw.validate(&path).map(|c| (c, warnings))
    });
    let (config, warnings) = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    private_files();
    init_logging(log_format.map(Into::into).unwrap_or(config.log.format), &config.log.level);
    for w in warnings {
        tracing::warn!(problem = %w, "file permissions");
    }
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logging is set up (to stderr): one line, not two. The
            // error is the message itself, so the human format
            // prints it as written (a field's value would be quoted
            // and escaped).
            tracing::error!("switchboard stopped: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes every file and directory the relay creates from here on private
/// to its user (0600, 0700), whatever umask it was started with: the store
/// holds callback bodies and the credentials in them. A stricter umask the
/// operator chose is kept (077 is only added).
fn private_files() {
    use nix::sys::stat::{umask, Mode};
    let old = umask(Mode::from_bits_truncate(0o077));
    umask(old | Mode::from_bits_truncate(0o077));
}

fn init_logging(format: LogFormat, level: &str) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // h2 warns once per connection it closes for a rapid-reset flood; the
    // server counts those and logs them once a second (`server/mod.rs`).
    // A filter that names h2 itself is left as written.
    let named = std::env::var("RUST_LOG").map_or_else(|_| level.contains("h2"), |v| v.contains("h2"));
    if !named {
        if let Ok(d) = "h2=error".parse() {
            filter = filter.add_directive(d);
        }
    }
    // Colour only for a person at a terminal: never in files or journals,
    // and never when NO_COLOR is set (https://no-color.org).
    use std::io::IsTerminal;
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colour).with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listeners = crate::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let reload = std::sync::Arc::new(tokio::sync::Notify::new());
        crate::relay::shutdown::on_signals(shutdown.clone(), reload.clone())?;
        crate::run_with_reload(config, listeners, shutdown, reload).await
    })
}

/// `switchboard transform`: a destination's transform on a body from a
/// file, printed as the destination would get it.
/// What `transform` runs the script on.
pub enum Tried {
    File { file: PathBuf, content_type: String },
    Message { id: String, admin: Option<String>, token: Option<String> },
}

/// A callback to try a transform on: id, route, time, headers, body.
struct Callback {
    id: String,
    route: String,
    received_ms: u64,
    headers: Vec<(String, bytes::Bytes)>,
    body: Vec<u8>,
}

/// The stored message `id`, from the admin API.
fn fetch_message(
    config: &std::path::Path,
    id: &str,
    admin: Option<String>,
    token: Option<String>,
) -> Result<Callback, ExitCode> {
    let target = crate::client::ctl::Target { admin, token, config: Some(config.to_path_buf()) };
    let fetched = crate::client::ctl::AdminClient::new(&target).and_then(|client| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| crate::client::ctl::CtlError::Failed(format!("cannot start: {e}")))?;
        rt.block_on(client.message(id, true))
    });
    let v = fetched.map_err(|e| {
        eprintln!("error: {e}");
        ExitCode::from(e.exit_code())
    })?;
    let body = match (v["body"].as_str(), v["body_base64"].as_str()) {
        (Some(text), _) => text.as_bytes().to_vec(),
        (None, Some(b64)) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default()
        }
        (None, None) => Vec::new(),
    };
    let headers = v["headers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| Some((h["name"].as_str()?.to_string(), bytes::Bytes::from(h["value"].as_str()?.to_string()))))
        .collect();
    let received_ms = v["received_at"]
        .as_str()
        .and_then(|t| humantime::parse_rfc3339(t).ok())
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(crate::text::now_ms, |d| d.as_millis() as u64);
    Ok(Callback {
        id: v["id"].as_str().unwrap_or(id).to_string(),
        route: v["route"].as_str().unwrap_or("/").to_string(),
        received_ms,
        headers,
        body,
    })
}

/// `body` without the destination's `strip_body_fields` (a JSON object's
/// top-level fields), as delivery gives it to the transform.
fn stripped(body: Vec<u8>, fields: &[String]) -> Vec<u8> {
    if fields.is_empty() {
        return body;
    }
    match serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&body) {
        Ok(mut map) => {
            for f in fields {
                map.shift_remove(f);
            }
            serde_json::to_vec(&map).unwrap_or(body)
        }
        Err(_) => body,
    }
}

pub fn transform(config: PathBuf, destination: &str, tried: Tried) -> ExitCode {
    let cfg = match super::load(&config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(dest) = cfg.destinations.iter().find(|d| &*d.name == destination) else {
        eprintln!("error: no destination {destination:?} in {}", config.display());
        return ExitCode::from(EXIT_CONFIG);
    };
    let Some(t) = dest.transform.clone() else {
        eprintln!("error: destinations.{destination} has no transform: it gets the callback as received");
        return ExitCode::from(EXIT_CONFIG);
    };
    let callback = match tried {
        Tried::File { file, content_type } => {
            let body = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: cannot read {}: {e}", file.display());
                    return ExitCode::from(66);
                }
            };
            let route = cfg.routes.iter().find(|r| r.destinations.iter().any(|d| &**d == destination));
            Callback {
                id: "msg_tryout".to_string(),
                route: route.map_or("/", |r| &r.path).to_string(),
                received_ms: crate::text::now_ms(),
                headers: vec![("content-type".to_string(), bytes::Bytes::from(content_type))],
                body,
            }
        }
        Tried::Message { id, admin, token } => match fetch_message(&config, &id, admin, token) {
            Ok(c) => c,
            Err(code) => return code,
        },
    };
    let body = stripped(callback.body, &dest.strip_body_fields);
    let input = crate::delivery::transform::Input {
        id: &callback.id,
        route: &callback.route,
        received_ms: callback.received_ms,
        headers: &callback.headers,
        body: &body,
    };
    match t.run_blocking(&input) {
        Ok(crate::delivery::transform::Reshaped::Skip) => {
            println!("# {destination}: not sent (the transform returned null; counted as filtered)");
            ExitCode::SUCCESS
        }
        Ok(crate::delivery::transform::Reshaped::Send { body, headers }) => {
            println!("# {destination} would receive (besides the relay's own headers):");
            for (name, value) in &headers {
                println!("{name}: {}", value.to_str().unwrap_or("<binary>"));
            }
            println!();
            println!("{}", String::from_utf8_lossy(&body));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("transform failed ({}): {e}", t.origin);
            ExitCode::FAILURE
        }
    }
}
