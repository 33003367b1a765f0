//! Transformations (`[destinations.NAME.transform]`): a JavaScript function
//! `transform(req)` reshapes what one destination gets, at delivery time,
//! on QuickJS (`rquickjs`), bounded the way Svix Bridge bounds it: a memory
//! limit on the runtime and an interrupt handler that stops a call at its
//! deadline.
//!
//! - **Input** `req`: `id`, `route`, `received_at` (RFC 3339), `headers`
//!   (the stored ones, lower-case names), `body` (parsed JSON, or `null`),
//!   `text` (the body as a string when it is UTF-8, else `null`), `base64`.
//!   The body is the one the destination would otherwise get (after
//!   `strip_body_fields`: removed credentials never reach a script).
//! - **Output**: `{ body, headers }` (a `body` object or array is sent as
//!   JSON, a string as is, absent: the input body; `headers` added or
//!   replaced, hop-by-hop names refused), or `null`: not delivered to this
//!   destination (counted as filtered).
//! - **Bounded and stateless**: each call evaluates the script afresh in a
//!   context whose globals and built-in prototypes are frozen (no state
//!   survives a call); no I/O exists in the engine; `Date` without
//!   arguments and `Date.now` throw (no clock but `received_at`). A call
//!   that runs past `timeout`, allocates past `memory` or throws fails,
//!   deterministically: the caller dead-letters the delivery with the
//!   reason and its line.
//! - **XML**: `xml(text)` turns an XML document (ThingSpace's SOAP
//!   callbacks) into an object: an element is an object of its children
//!   by local name (repeated names become arrays), attributes as `@name`,
//!   text as `#text`, or the text itself for an element with only text.
//!
//! Calls run on the transform's own two threads (a script may take its
//! whole timeout; a slow script delays only its own destination), each
//! with one engine kept warm and replaced after a failure.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use rquickjs::{Context, Function, Persistent, Runtime};

/// One destination's transformation, compiled once at load (`check`).
pub struct Transform {
    /// Where the script came from (`file:...` or `inline`), for errors.
    pub origin: String,
    source: Arc<str>,
    pub timeout: Duration,
    pub memory: usize,
    /// Its threads, started at the first call.
    pool: OnceLock<Pool>,
}

impl std::fmt::Debug for Transform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transform")
            .field("origin", &self.origin)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How many threads run one transform's calls (each with its engine).
const THREADS: usize = 2;

type Answer = Result<Option<String>, String>;

/// Where a call's answer goes.
enum Reply {
    Async(tokio::sync::oneshot::Sender<Answer>),
    Blocking(std::sync::mpsc::Sender<Answer>),
}

struct Job {
    input: Input3,
    reply: Reply,
}

/// A call's arguments: `req` without its body (JSON), the body as text
/// (`None`: not UTF-8) and, only for a body that is not UTF-8, its base64.
/// The script's `req.body` and `req.base64` are made from them on first
/// use (a transform that only sets headers parses nothing).
struct Input3 {
    meta: String,
    text: Option<String>,
    base64: Option<String>,
}

/// A transform's threads: each owns one engine (kept warm between calls,
/// replaced after a failure) and a queue of its own; a call goes to the
/// thread with the fewest calls queued or running, so a slow call delays
/// only what is queued behind it on its thread. They end, and drop their
/// engines on their own thread, when the transform is dropped (a reload,
/// shutdown). Engines are never dropped by thread-local destructors: that
/// crashed (QuickJS's own state may be gone by then).
struct Pool {
    threads: Vec<(std::sync::mpsc::Sender<Job>, Arc<std::sync::atomic::AtomicUsize>)>,
}

/// How long a thread that finished a call looks for the next one before
/// it sleeps: under load the next call is usually there by then, and
/// waking a sleeping thread costs more than the call.
const LINGER: Duration = Duration::from_micros(50);

/// The next call for a thread (`None`: the transform was dropped).
fn next_job(rx: &std::sync::mpsc::Receiver<Job>) -> Option<Job> {
    let until = Instant::now() + LINGER;
    loop {
        match rx.try_recv() {
            Ok(job) => return Some(job),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            Err(std::sync::mpsc::TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
            Err(std::sync::mpsc::TryRecvError::Empty) => return rx.recv().ok(),
        }
    }
}

impl Pool {
    fn start(source: Arc<str>, timeout: Duration, memory: usize) -> Pool {
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let (tx, rx) = std::sync::mpsc::channel::<Job>();
            let load = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let (mine, source) = (load.clone(), source.clone());
            let spawned = std::thread::Builder::new().name(format!("transform-{i}")).spawn(move || {
                let mut engine: Option<Engine> = None;
                while let Some(job) = next_job(&rx) {
                    let answer = match engine.take().map_or_else(|| Engine::compiled(&source, memory), Ok) {
                        Ok(e) => {
                            let answer = e.call(&job.input, timeout);
                            // A runtime that hit its limits is not reused.
                            if answer.is_ok() {
                                engine = Some(e);
                            }
                            answer
                        }
                        Err(e) => Err(e),
                    };
                    mine.fetch_sub(1, Ordering::Relaxed);
                    match job.reply {
                        Reply::Async(tx) => {
                            let _ = tx.send(answer);
                        }
                        Reply::Blocking(tx) => {
                            let _ = tx.send(answer);
                        }
                    }
                }
            });
            match spawned {
                Ok(_) => threads.push((tx, load)),
                Err(e) => tracing::error!(error = %e, "cannot start a transform thread"),
            }
        }
        Pool { threads }
    }

    fn submit(&self, job: Job) -> Result<(), String> {
        let (tx, load) = self
            .threads
            .iter()
            .min_by_key(|(_, load)| load.load(Ordering::Relaxed))
            .ok_or_else(|| "the transform has no thread".to_string())?;
        load.fetch_add(1, Ordering::Relaxed);
        tx.send(job).map_err(|_| "the transform's threads are gone".to_string())
    }
}

/// What a destination gets instead of the stored request.
#[derive(Debug, PartialEq)]
pub enum Reshaped {
    Send {
        body: Bytes,
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// `null`: not delivered to this destination.
    Skip,
}

/// What the script sees of a message.
pub struct Input<'a> {
    pub id: &'a str,
    pub route: &'a str,
    pub received_ms: u64,
    pub headers: &'a [(String, Bytes)],
    pub body: &'a [u8],
}

const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
];

/// Freezes what a script could use to keep state between calls or read
/// the clock. Runs once per engine, before any script.
const LOCKDOWN: &str = r#"
(function () {
  const RealDate = Date;
  // Frames of these functions (named __sb_) are not the script's: an
  // error's line is taken from the first frame that is.
  function __sb_Date(...args) {
    if (args.length === 0) throw new Error("no clock in transforms: use req.received_at");
    return new RealDate(...args);
  }
  __sb_Date.prototype = RealDate.prototype;
  __sb_Date.parse = RealDate.parse;
  __sb_Date.UTC = RealDate.UTC;
  __sb_Date.now = function __sb_now() { throw new Error("no clock in transforms: use req.received_at"); };
  globalThis.Date = __sb_Date;
  const xmlNative = globalThis.__xml;
  globalThis.xml = function __sb_xml(text) { return JSON.parse(xmlNative(String(text))); };
  delete globalThis.__xml;
  const b64Native = globalThis.__b64;
  globalThis.__sb_b64 = function __sb_b64(text) { return b64Native(String(text)); };
  delete globalThis.__b64;
  for (const name of Object.getOwnPropertyNames(globalThis)) {
    const v = globalThis[name];
    if ((typeof v === "object" || typeof v === "function") && v !== null) {
      Object.freeze(v);
      if (v.prototype) Object.freeze(v.prototype);
    }
  }
  Object.freeze(Object.getPrototypeOf(function* () {}));
  Object.freeze(globalThis);
})();
"#;

/// The script wrapped so each call starts from nothing: the script's own
/// declarations live in the function, the input comes as an argument.
/// The prefix has no newline, so line numbers are the script's.
fn wrapped_body(source: &str) -> String {
    format!(
        "{source}\n;if (typeof transform !== \"function\") throw new Error(\"the script defines no function transform(req)\");\n{REQ}\nconst __out = transform(__req);\nreturn __out === null ? null : JSON.stringify(__out === undefined ? {{}} : __out);"
    )
}

/// `req` from the call's arguments: `body` parsed and `base64` encoded on
/// first read (and assignable), `text` as is.
const REQ: &str = r#"const __req = JSON.parse(__input);
let __body, __parsed = false, __b64v = __bytes == null ? null : __bytes;
const __txt = __text == null ? null : __text;
Object.defineProperty(__req, "body", { enumerable: true, configurable: true,
  get() { if (!__parsed) { __parsed = true; try { __body = __txt === null ? null : JSON.parse(__txt); } catch (_) { __body = null; } } return __body; },
  set(v) { __parsed = true; __body = v; } });
Object.defineProperty(__req, "text", { enumerable: true, configurable: true, writable: true, value: __txt });
Object.defineProperty(__req, "base64", { enumerable: true, configurable: true,
  get() { if (__b64v === null) __b64v = __sb_b64(__txt); return __b64v; },
  set(v) { __b64v = v; } });"#;

/// A deadline the interrupt handler reads (nanoseconds since `base()`).
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Fields drop in order: the compiled function, then the context, then
/// the runtime they live in (the other order crashed).
struct Engine {
    /// The script wrapped in `(function (__input) {...})`, compiled once:
    /// each call runs its body afresh (its declarations are the call's own),
    /// without parsing it again.
    compiled: Option<Persistent<Function<'static>>>,
    context: Context,
    runtime: Runtime,
    deadline: Arc<AtomicU64>,
}

impl Engine {
    fn new(memory: usize) -> Result<Engine, String> {
        let runtime = Runtime::new().map_err(|e| format!("cannot start the script engine: {e}"))?;
        runtime.set_memory_limit(memory);
        runtime.set_max_stack_size(256 * 1024);
        let deadline = Arc::new(AtomicU64::new(u64::MAX));
        let d = deadline.clone();
        runtime.set_interrupt_handler(Some(Box::new(move || {
            base().elapsed().as_nanos() as u64 > d.load(Ordering::Relaxed)
        })));
        let context = Context::full(&runtime).map_err(|e| format!("cannot start the script engine: {e}"))?;
        context.with(|ctx| -> Result<(), String> {
            let native = Function::new(ctx.clone(), |text: String| -> String { super::xml::xml_to_json(&text) })
                .map_err(|e| format!("script engine: {e}"))?;
            ctx.globals().set("__xml", native).map_err(|e| format!("script engine: {e}"))?;
            let b64 = Function::new(ctx.clone(), |text: String| -> String {
                base64::engine::general_purpose::STANDARD.encode(text.as_bytes())
            })
            .map_err(|e| format!("script engine: {e}"))?;
            ctx.globals().set("__b64", b64).map_err(|e| format!("script engine: {e}"))?;
            ctx.eval::<(), _>(LOCKDOWN).map_err(|e| format!("script engine: {e}"))
        })?;
        Ok(Engine { compiled: None, context, runtime, deadline })
    }

    /// An engine with `source`'s transform compiled.
    fn compiled(source: &str, memory: usize) -> Result<Engine, String> {
        let mut engine = Engine::new(memory)?;
        let compiled = engine.context.with(|ctx| -> Result<Persistent<Function<'static>>, String> {
            let f: Function = ctx
                .eval(format!("(function (__input, __text, __bytes) {{{}\n}})", wrapped_body(source)))
                .map_err(|e| describe(&ctx, e))?;
            Ok(Persistent::save(&ctx, f))
        })?;
        engine.compiled = Some(compiled);
        Ok(engine)
    }

    /// Runs the compiled transform on `input` (JSON) within `timeout`.
    fn call(&self, input: &Input3, timeout: Duration) -> Result<Option<String>, String> {
        let Some(compiled) = self.compiled.clone() else { return Err("no script compiled".to_string()) };
        let deadline = base().elapsed() + timeout;
        self.deadline.store(deadline.as_nanos() as u64, Ordering::Relaxed);
        let result = self.context.with(|ctx| {
            let f = compiled.restore(&ctx).map_err(|e| format!("script engine: {e}"))?;
            f.call::<_, Option<String>>((input.meta.as_str(), input.text.as_deref(), input.base64.as_deref()))
                .map_err(|e| describe(&ctx, e))
        });
        self.deadline.store(u64::MAX, Ordering::Relaxed);
        match result {
            Err(e) if base().elapsed() >= deadline && e.contains("interrupted") => {
                Err(format!("stopped after {} (transform timeout): {e}", humantime::format_duration(timeout)))
            }
            other => other,
        }
    }

    /// Evaluates `(function (__input) { body })` and calls it with
    /// `input`, within `timeout`.
    fn run_function(&self, body: &str, input: &str, timeout: Duration) -> Result<Option<String>, String> {
        let deadline = base().elapsed() + timeout;
        self.deadline.store(deadline.as_nanos() as u64, Ordering::Relaxed);
        let result = self.context.with(|ctx| {
            let f: Function = match ctx.eval(format!("(function (__input) {{{body}\n}})")) {
                Ok(f) => f,
                Err(e) => return Err(describe(&ctx, e)),
            };
            f.call::<_, Option<String>>((input.to_string(),)).map_err(|e| describe(&ctx, e))
        });
        self.deadline.store(u64::MAX, Ordering::Relaxed);
        let _ = &self.runtime;
        match result {
            Err(e) if base().elapsed() >= deadline && e.contains("interrupted") => {
                Err(format!("stopped after {} (transform timeout): {e}", humantime::format_duration(timeout)))
            }
            other => other,
        }
    }
}

/// An exception as `message at line L` (the script's own line numbers:
/// exact for a `throw` and a syntax error; an error the engine raises
/// inside an expression, such as reading a property of `undefined`, is
/// placed by this QuickJS at the start of the function it happened in).
fn describe(ctx: &rquickjs::Ctx<'_>, e: rquickjs::Error) -> String {
    if !matches!(e, rquickjs::Error::Exception) {
        return match e {
            rquickjs::Error::Allocation => "out of memory (transform memory limit)".to_string(),
            other => other.to_string(),
        };
    }
    let caught = ctx.catch();
    let Some(obj) = caught.as_object() else {
        return match caught.as_string().and_then(|s| s.to_string().ok()) {
            Some(s) => format!("uncaught {s}"),
            // QuickJS has no memory left to make an error object of.
            None if caught.is_null() || caught.is_undefined() => {
                "out of memory (the transform's memory limit)".to_string()
            }
            None => format!("uncaught {caught:?}"),
        };
    };
    let message: String = obj.get("message").unwrap_or_default();
    let name: String = obj.get("name").unwrap_or_default();
    let stack: String = obj.get("stack").unwrap_or_default();
    // QuickJS stacks read "    at transform (eval_script:3:7)" (or
    // "<eval>:3"); the first line number is where it was thrown.
    let line = stack
        .lines()
        .filter(|l| !l.contains("__sb_"))
        .find_map(|l| {
            let inner = l.rsplit_once('(').map_or(l, |(_, r)| r).trim_end_matches(')');
            let mut parts = inner.rsplit(':');
            let a = parts.next()?.trim().parse::<u32>().ok();
            let b = parts.next().and_then(|p| p.trim().parse::<u32>().ok());
            b.or(a)
        })
        .or_else(|| obj.get::<_, u32>("lineNumber").ok());
    let what = if message.is_empty() {
        if name.is_empty() {
            "out of memory (transform memory limit)".to_string()
        } else {
            name
        }
    } else if name.is_empty() {
        message
    } else {
        format!("{name}: {message}")
    };
    match line {
        Some(l) => format!("{what} at line {l}"),
        None => what,
    }
}

impl Transform {
    /// Loads `source` and checks that it compiles and defines
    /// `transform`; the error names the line.
    pub fn new(origin: String, source: String, timeout: Duration, memory: usize) -> Result<Transform, String> {
        let t = Transform { origin, source: source.into(), timeout, memory, pool: OnceLock::new() };
        // Compiles it and runs its top level (bounded like a call) to see
        // that it defines `transform`, without calling it.
        let engine = Engine::new(memory)?;
        let probe = format!("{}\n;return typeof transform;", t.source);
        match engine.run_function(&probe, "", timeout)? {
            Some(kind) if kind == "function" => Ok(t),
            _ => Err("the script defines no function transform(req)".to_string()),
        }
    }

    fn pool(&self) -> &Pool {
        self.pool.get_or_init(|| Pool::start(self.source.clone(), self.timeout, self.memory))
    }

    /// Runs the transformation on `input`, on the transform's own threads.
    pub async fn run(&self, input: &Input<'_>) -> Result<Reshaped, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.pool().submit(Job { input: input3(input), reply: Reply::Async(tx) })?;
        let out = rx.await.map_err(|_| "the transform's thread ended".to_string())??;
        answer_to_reshaped(out, input.body)
    }

    /// [`Transform::run`] for a caller outside an async runtime (the CLI,
    /// the benchmark).
    pub fn run_blocking(&self, input: &Input<'_>) -> Result<Reshaped, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.pool().submit(Job { input: input3(input), reply: Reply::Blocking(tx) })?;
        let out = rx.recv().map_err(|_| "the transform's thread ended".to_string())??;
        answer_to_reshaped(out, input.body)
    }
}

fn answer_to_reshaped(out: Option<String>, original: &[u8]) -> Result<Reshaped, String> {
    match out {
        None => Ok(Reshaped::Skip),
        Some(text) => reshaped(&text, original),
    }
}

/// A call's arguments for `input`: `req`'s small fields as JSON, the
/// body as text, and its base64 only when it is not UTF-8 (else the script
/// encodes the text on first read of `req.base64`).
fn input3(input: &Input<'_>) -> Input3 {
    #[derive(serde::Serialize)]
    struct Meta<'a> {
        id: &'a str,
        route: &'a str,
        received_at: String,
        headers: std::collections::BTreeMap<String, std::borrow::Cow<'a, str>>,
    }
    let meta = Meta {
        id: input.id,
        route: input.route,
        received_at: crate::text::rfc3339(input.received_ms),
        headers: input.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), String::from_utf8_lossy(v))).collect(),
    };
    let text = std::str::from_utf8(input.body).ok().map(str::to_string);
    let base64 = text.is_none().then(|| base64::engine::general_purpose::STANDARD.encode(input.body));
    Input3 { meta: serde_json::to_string(&meta).unwrap_or_else(|_| "{}".to_string()), text, base64 }
}

/// The script's answer (`JSON.stringify`'d) as what to send.
fn reshaped(text: &str, original: &[u8]) -> Result<Reshaped, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| format!("the result is not JSON: {e}"))?;
    let Some(obj) = v.as_object() else {
        return Err("transform must return { body, headers } or null".to_string());
    };
    let mut headers = Vec::new();
    let body = match obj.get("body") {
        None => Bytes::copy_from_slice(original),
        Some(serde_json::Value::String(s)) => Bytes::from(s.clone()),
        Some(other) => {
            // Sent as JSON, and said so unless the script says otherwise.
            headers.push((http::header::CONTENT_TYPE, HeaderValue::from_static("application/json")));
            Bytes::from(serde_json::to_vec(other).map_err(|e| format!("cannot encode the body: {e}"))?)
        }
    };
    if let Some(h) = obj.get("headers") {
        let Some(map) = h.as_object() else { return Err("headers must be an object of strings".to_string()) };
        for (name, value) in map {
            let lower = name.to_ascii_lowercase();
            if HOP_BY_HOP.contains(&lower.as_str()) {
                return Err(format!("header {lower:?} is hop-by-hop: a transform cannot set it"));
            }
            let value = match value {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let name =
                HeaderName::from_bytes(lower.as_bytes()).map_err(|_| format!("{lower:?} is not a header name"))?;
            let value = HeaderValue::from_str(&value).map_err(|_| format!("header {lower:?}: not a valid value"))?;
            headers.retain(|(n, _)| *n != name);
            headers.push((name, value));
        }
    }
    Ok(Reshaped::Send { body, headers })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(body: &[u8]) -> Input<'_> {
        Input { id: "msg_1", route: "/in", received_ms: 1_700_000_000_000, headers: &[], body }
    }

    fn t(source: &str) -> Transform {
        Transform::new("inline".into(), source.into(), Duration::from_millis(100), 16 << 20).expect("compiles")
    }

    #[test]
    fn reshapes_skips_and_keeps_no_state() {
        let body = br#"{"requestId":"r1","status":"Success"}"#;
        let got = t("function transform(req) { return { body: { text: req.body.requestId + ' ' + req.route }, headers: { 'X-A': 1 } }; }")
            .run_blocking(&input(body))
            .expect("runs");
        let Reshaped::Send { body: sent, headers } = got else { panic!("sent") };
        assert_eq!(&sent[..], br#"{"text":"r1 /in"}"#);
        assert!(headers.iter().any(|(n, v)| n == "x-a" && v == "1"), "{headers:?}");
        assert!(headers.iter().any(|(n, v)| n == "content-type" && v == "application/json"), "{headers:?}");
        assert_eq!(t("function transform(req) { return null; }").run_blocking(&input(body)), Ok(Reshaped::Skip));
        let counter =
            t("let n = 0; function transform(req) { n += 1; globalThis.leak = n; return { body: String(n) }; }");
        for _ in 0..3 {
            match counter.run_blocking(&input(body)) {
                Ok(Reshaped::Send { body, .. }) => assert_eq!(&body[..], b"1", "fresh each call"),
                other => assert!(other.is_err(), "a frozen global refuses the leak: {other:?}"),
            }
        }
    }

    /// `body`, `text` and `base64` as the script sees them (made on first
    /// read): for JSON, text that is not JSON, and bytes that are not UTF-8;
    /// `body` assignable; all three in `JSON.stringify(req)`.
    #[test]
    fn the_body_in_its_three_forms() {
        let show = t("function transform(req) { return { body: JSON.stringify([req.body, req.text, req.base64]) }; }");
        let sent = |body: &[u8]| match show.run_blocking(&input(body)) {
            Ok(Reshaped::Send { body, .. }) => String::from_utf8_lossy(&body).into_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(sent(br#"{"a":1}"#), r#"[{"a":1},"{\"a\":1}","eyJhIjoxfQ=="]"#);
        assert_eq!(sent(b"plain"), r#"[null,"plain","cGxhaW4="]"#);
        assert_eq!(sent(&[0xff, 0x00, 0x41]), r#"[null,null,"/wBB"]"#);
        let whole = t("function transform(req) { req.body = { b: 2 }; return { body: JSON.stringify(req) }; }");
        let Ok(Reshaped::Send { body, .. }) = whole.run_blocking(&input(br#"{"a":1}"#)) else { panic!("sent") };
        let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["body"], serde_json::json!({ "b": 2 }));
        assert_eq!(v["text"], r#"{"a":1}"#);
        assert_eq!(v["base64"], "eyJhIjoxfQ==");
        assert_eq!(v["route"], "/in");
    }

    #[test]
    fn loops_allocations_throws_and_clocks_are_stopped_with_the_line() {
        let looping = t("function transform(req) {\n  while (true) {}\n}");
        let err = looping.run_blocking(&input(b"{}")).expect_err("stopped");
        assert!(err.contains("timeout"), "{err}");
        // Time enough that only the memory limit can stop it (with the
        // default 100 ms, a busy machine ran out of time first).
        let hungry = Transform::new(
            "inline".into(),
            "function transform(req) {\n  const a = [];\n  while (true) a.push('x'.repeat(1000));\n}".into(),
            Duration::from_secs(30),
            16 << 20,
        )
        .expect("compiles");
        let err = hungry.run_blocking(&input(b"{}")).expect_err("stopped");
        assert!(err.contains("memory"), "{err}");
        let throws = t("function transform(req) {\n  // a comment\n  throw new Error('no way');\n}");
        let err = throws.run_blocking(&input(b"{}")).expect_err("thrown");
        assert!(err.contains("no way") && err.contains("line 3"), "{err}");
        let clock = t("function transform(req) { return { body: String(Date.now()) }; }");
        assert!(clock.run_blocking(&input(b"{}")).expect_err("no clock").contains("no clock"));
        let hop = t("function transform(req) { return { headers: { Connection: 'close' } }; }");
        assert!(hop.run_blocking(&input(b"{}")).expect_err("refused").contains("hop-by-hop"));
        // The engine that failed is not reused: the next call works.
        assert!(t("function transform(req) { return {}; }").run_blocking(&input(b"{}")).is_ok());
    }

    #[test]
    fn syntax_errors_name_the_line_and_a_missing_function_is_named() {
        let err = Transform::new(
            "inline".into(),
            "function transform(req) {\n  return {;\n}".into(),
            Duration::from_millis(100),
            16 << 20,
        )
        .expect_err("syntax");
        assert!(err.contains("line 2"), "{err}");
        let err = Transform::new("inline".into(), "function other() {}".into(), Duration::from_millis(100), 16 << 20)
            .expect_err("no transform");
        assert!(err.contains("transform(req)"), "{err}");
    }
}
