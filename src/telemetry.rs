//! Logging set-up, in one place: pretty for people, JSON for machines (`CREDSYNC_LOG_FORMAT`).
//! `RUST_LOG` filters (default `info`). Nothing here formats request bodies or headers.
//!
//! Lines go to stderr in batches ([`Batched`]): each line is appended to a buffer, which a
//! thread of its own writes `COLLECT` after the first line arrived in it (at once when it
//! holds `FLUSH_AT` bytes), before a panic message, and when the command ends ([`LogGuard`]).
//! stderr is unbuffered, and one `write` per access line was 3–4 % of a forwarded read's CPU.
//! A quiet service's line is on stderr about `COLLECT` after it was logged; a busy one writes
//! every line logged in that window at once. A process killed outright loses at most that much.
//!
//! Logging never waits for stderr: a thread that logs only appends. When stderr stalls (a slow
//! disk, a log collector that stopped reading its pipe) lines gather up to `MAX_PENDING`; past
//! that they are dropped, counted in `credsync_log_lines_dropped_total` and reported in a
//! warning once stderr takes lines again. Before, a full buffer was written by the thread that
//! filled it, which then waited behind the stalled write: every request on its worker stalled
//! with it.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use std::fmt::Write as _;

use tracing_log::NormalizeEvent as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::LogFormat;
use crate::error::REQUEST_ID;

/// What `RUST_LOG` means when it is unset, empty or unreadable.
const DEFAULT_DIRECTIVES: &str = "info,sqlx=warn";

/// The filter `RUST_LOG` asks for.
///
/// A list of `target=level` directives (the usual case) becomes a static [`Targets`] filter,
/// decided once per call site. Only directives that name spans or span fields (`[span{f=v}]`)
/// need [`EnvFilter`], which looks up every span in a locked map on every enter and exit: sqlx
/// enters the current span around every row, ~300 times per `/v1` page, and that was 8–11 % of
/// the request's CPU.
#[derive(Debug)]
enum LogFilter {
    Static(Box<Targets>),
    Spans(Box<EnvFilter>),
}

impl LogFilter {
    fn parse(directives: Option<&str>) -> LogFilter {
        let directives = directives
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .unwrap_or(DEFAULT_DIRECTIVES);
        // `Targets` would read a bracket as part of a target's name.
        let names_spans = directives.contains(['[', '{']);
        if !names_spans && let Ok(targets) = directives.parse::<Targets>() {
            return LogFilter::Static(Box::new(targets));
        }
        match EnvFilter::try_new(directives) {
            Ok(filter) => LogFilter::Spans(Box::new(filter)),
            Err(_) => LogFilter::parse(None),
        }
    }

    fn into_layer(self) -> Box<dyn Layer<Registry> + Send + Sync> {
        match self {
            LogFilter::Static(targets) => (*targets).boxed(),
            LogFilter::Spans(filter) => (*filter).boxed(),
        }
    }
}

/// A buffer is written out at once when it holds this much ...
const FLUSH_AT: usize = 32 * 1024;
/// ... else this long after its first line.
const COLLECT: Duration = Duration::from_millis(2);
/// Lines that would take the buffer past this (stderr stalled) are dropped and counted.
const MAX_PENDING: usize = 4 * 1024 * 1024;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whole log lines, appended in the order they were logged, written to `out` in batches.
pub struct Batched<W: 'static> {
    /// Lines not written yet.
    pending: Mutex<Vec<u8>>,
    /// The destination and an empty buffer to swap in: held while a batch is written, so that
    /// batches reach it in order.
    out: Mutex<(W, Vec<u8>)>,
    /// Signalled when a line lands in an empty `pending` (the flusher waits for it).
    arrived: Condvar,
    /// Lines dropped because `pending` was full, since the flusher last reported them.
    dropped: AtomicU64,
}

impl<W: std::io::Write + Send + 'static> Batched<W> {
    pub const fn new(out: W) -> Batched<W> {
        Batched {
            pending: Mutex::new(Vec::new()),
            out: Mutex::new((out, Vec::new())),
            arrived: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Append one line (the fmt layer hands over each line whole, in one write). Never waits
    /// for the destination: a line that does not fit in [`MAX_PENDING`] is dropped and counted.
    pub fn push(&self, line: &[u8]) {
        let first = {
            let mut pending = lock(&self.pending);
            if pending.len() + line.len() > MAX_PENDING {
                drop(pending);
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let first = pending.is_empty();
            pending.extend_from_slice(line);
            first
        };
        if first {
            self.arrived.notify_one();
        }
    }

    /// Lines dropped since the last call.
    fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Write out everything appended so far.
    pub fn flush(&self) {
        let mut out = lock(&self.out);
        let (dest, batch) = &mut *out;
        std::mem::swap(batch, &mut *lock(&self.pending));
        Self::write_out(dest, batch);
    }

    /// [`Batched::flush`] unless a lock is held (a batch being written, or a panic raised while
    /// one of them was held): for the panic hook, which must never wait on this thread's lock.
    fn flush_unless_busy(&self) {
        fn take<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
            match m.try_lock() {
                Ok(g) => Some(g),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        }
        let Some(mut out) = take(&self.out) else {
            return;
        };
        let (dest, batch) = &mut *out;
        let Some(mut pending) = take(&self.pending) else {
            return;
        };
        std::mem::swap(batch, &mut *pending);
        drop(pending);
        Self::write_out(dest, batch);
    }

    fn write_out(dest: &mut W, batch: &mut Vec<u8>) {
        if !batch.is_empty() {
            // Nowhere to report a failed log write: the batch is dropped, as stderr would.
            let _ = dest.write_all(batch);
            let _ = dest.flush();
            batch.clear();
        }
    }

    /// A writer for the fmt layer, appending to this buffer.
    pub fn writer(&'static self) -> impl for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static {
        move || Line(self)
    }

    /// From a thread of its own: wait for a line, let more gather for [`COLLECT`], write them.
    fn spawn_flusher(&'static self) {
        let _ = std::thread::Builder::new()
            .name("credsync-log".into())
            .spawn(move || {
                loop {
                    let full = {
                        let mut pending = lock(&self.pending);
                        while pending.is_empty() {
                            pending = self
                                .arrived
                                .wait(pending)
                                .unwrap_or_else(PoisonError::into_inner);
                        }
                        pending.len() >= FLUSH_AT
                    };
                    if !full {
                        std::thread::sleep(COLLECT);
                    }
                    self.flush();
                    let dropped = self.take_dropped();
                    if dropped > 0 {
                        metrics::counter!("credsync_log_lines_dropped_total").increment(dropped);
                        tracing::warn!(dropped, "log lines dropped: stderr did not keep up");
                    }
                }
            });
    }
}

struct Line<W: 'static>(&'static Batched<W>);

impl<W: std::io::Write + Send + 'static> std::io::Write for Line<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The process's stderr (`std::io::stderr()` cannot be called in a static's initializer).
struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

static STDERR: Batched<Stderr> = Batched::new(Stderr);

/// Writes out the log lines still buffered when it is dropped (at the end of every command).
#[must_use = "dropping the guard writes out the buffered log lines at once"]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        STDERR.flush();
    }
}

/// Timestamps in credsync's canonical form (the one tracing's default timer writes, too),
/// without going through `fmt`.
struct LogTime;

impl fmt::time::FormatTime for LogTime {
    fn format_time(&self, w: &mut fmt::format::Writer<'_>) -> std::fmt::Result {
        crate::timefmt::with_canonical(time::OffsetDateTime::now_utc(), |s| w.write_str(s))
    }
}

/// The JSON log line, written straight into the line buffer: `timestamp`, `level`, the event's
/// fields (its message as `message`), `target`, the request's `request_id` when logged inside
/// one and the event does not carry it itself, and the current span (`span`: its name and
/// fields) when there is one.
///
/// tracing-subscriber's own JSON formatter goes through serde for every line and parses the
/// current span's fields back from text to write them again; a request span around every
/// request cost a forwarded read its creation, its field formatting and an enter and exit per
/// poll. The request id comes from the request's task-local instead ([`REQUEST_ID`]).
struct JsonLine;

impl<S, N> fmt::FormatEvent<S, N> for JsonLine
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &fmt::FmtContext<'_, S, N>,
        mut w: fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        w.write_str("{\"timestamp\":\"")?;
        fmt::time::FormatTime::format_time(&LogTime, &mut w)?;
        w.write_str("\",\"level\":\"")?;
        w.write_str(meta.level().as_str())?;
        w.write_char('"')?;
        let mut fields = JsonFieldsOut {
            w: &mut w,
            skip_log_fields: normalized.is_some(),
            request_id: false,
            result: Ok(()),
        };
        event.record(&mut fields);
        let (result, has_request_id) = (fields.result, fields.request_id);
        result?;
        w.write_str(",\"target\":")?;
        write_json_str(&mut w, meta.target())?;
        if !has_request_id {
            REQUEST_ID
                .try_with(|id| {
                    w.write_str(",\"request_id\":")?;
                    write_json_str(&mut w, id)
                })
                .unwrap_or(Ok(()))?;
        }
        let span = event
            .parent()
            .and_then(|id| ctx.span(id))
            .or_else(|| ctx.lookup_current());
        if let Some(span) = span {
            w.write_str(",\"span\":{")?;
            let ext = span.extensions();
            // The span's fields as the JSON field formatter recorded them: one object's text.
            let recorded = ext
                .get::<fmt::FormattedFields<N>>()
                .map(|f| f.fields.as_str().trim())
                .and_then(|f| f.strip_prefix('{')?.strip_suffix('}'))
                .map(str::trim)
                .filter(|f| !f.is_empty());
            if let Some(recorded) = recorded {
                w.write_str(recorded)?;
                w.write_char(',')?;
            }
            w.write_str("\"name\":")?;
            write_json_str(&mut w, span.metadata().name())?;
            w.write_char('}')?;
        }
        w.write_str("}\n")
    }
}

/// Writes an event's fields as JSON members, each after a comma.
struct JsonFieldsOut<'a, 'w> {
    w: &'a mut fmt::format::Writer<'w>,
    /// A `log` record's own metadata fields (`log.target`, ...), already in the line.
    skip_log_fields: bool,
    /// Whether the event carries `request_id` itself.
    request_id: bool,
    result: std::fmt::Result,
}

impl JsonFieldsOut<'_, '_> {
    fn member(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut fmt::format::Writer<'_>) -> std::fmt::Result,
    ) {
        let name = field.name();
        if self.result.is_err() || (self.skip_log_fields && name.starts_with("log.")) {
            return;
        }
        self.request_id |= name == "request_id";
        self.result = (|| {
            self.w.write_char(',')?;
            write_json_str(self.w, name)?;
            self.w.write_char(':')?;
            value(self.w)
        })();
    }
}

impl tracing::field::Visit for JsonFieldsOut<'_, '_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.member(field, |w| write_json_str(w, value));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.member(field, |w| write!(w, "{value}"));
    }

    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        // JSON has no NaN or infinities: those are written as text.
        if value.is_finite() {
            self.member(field, |w| write!(w, "{value}"));
        } else {
            self.member(field, |w| write!(w, "\"{value}\""));
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.member(field, |w| {
            w.write_char('"')?;
            write!(JsonEscape(&mut *w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// `s` as a JSON string.
fn write_json_str(w: &mut impl std::fmt::Write, s: &str) -> std::fmt::Result {
    w.write_char('"')?;
    JsonEscape(&mut *w).write_str(s)?;
    w.write_char('"')
}

/// Escapes what is written through it for the inside of a JSON string.
struct JsonEscape<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for JsonEscape<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let mut plain = 0;
        for (i, b) in s.bytes().enumerate() {
            let escaped = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                0..0x20 => "",
                _ => continue,
            };
            self.0.write_str(&s[plain..i])?;
            if escaped.is_empty() {
                write!(self.0, "\\u{b:04x}")?;
            } else {
                self.0.write_str(escaped)?;
            }
            plain = i + 1;
        }
        self.0.write_str(&s[plain..])
    }
}

/// The JSON lines' layer ([`JsonLine`]), writing to `out`.
fn json_layer<S, W>(out: W) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    fmt::layer()
        .fmt_fields(fmt::format::JsonFields::new())
        .event_format(JsonLine)
        .with_writer(out)
}

/// Whether requests run in a span of their own (`request{request_id, method}`): for the pretty
/// format, whose lines show it as their prefix. JSON lines take the request id from the
/// request's task-local instead ([`JsonLine`]), and the span would only cost.
static REQUEST_SPANS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

pub fn request_spans() -> bool {
    REQUEST_SPANS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Install the global subscriber (once; later calls are ignored). Keep the guard until the
/// command ends.
pub fn init(format: LogFormat) -> LogGuard {
    let filter = LogFilter::parse(std::env::var("RUST_LOG").ok().as_deref());
    let registry = tracing_subscriber::registry().with(filter.into_layer());
    let installed = match format {
        LogFormat::Json => registry.with(json_layer(STDERR.writer())).try_init(),
        LogFormat::Pretty => registry
            .with(
                fmt::layer()
                    .with_timer(LogTime)
                    .with_writer(STDERR.writer()),
            )
            .try_init(),
    };
    if installed.is_ok() {
        REQUEST_SPANS.store(
            matches!(format, LogFormat::Pretty),
            std::sync::atomic::Ordering::Relaxed,
        );
        STDERR.spawn_flusher();
        // A panic's message goes straight to stderr: the lines logged before it go first.
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            STDERR.flush_unless_busy();
            report(info);
        }));
    }
    LogGuard(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tracing::Level;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>, Arc<std::sync::atomic::AtomicUsize>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(lock(&self.0).clone()).unwrap()
        }
        fn writes(&self) -> usize {
            self.1.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    fn batched() -> (&'static Batched<Sink>, Sink) {
        let sink = Sink::default();
        (Box::leak(Box::new(Batched::new(sink.clone()))), sink)
    }

    #[test]
    fn lines_from_many_threads_arrive_whole_and_each_thread_in_order() {
        let (b, sink) = batched();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        b.push(format!("thread {t} line {i} {}\n", "x".repeat(i % 97)).as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        b.flush();
        let text = sink.text();
        let mut next = [0usize; 4];
        for line in text.lines() {
            let mut words = line.split(' ');
            assert_eq!(words.next(), Some("thread"), "{line:?}");
            let t: usize = words.next().unwrap().parse().unwrap();
            assert_eq!(words.next(), Some("line"), "{line:?}");
            let i: usize = words.next().unwrap().parse().unwrap();
            assert_eq!(words.next(), Some("x".repeat(i % 97).as_str()), "{line:?}");
            assert_eq!(i, next[t], "thread {t} out of order");
            next[t] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    fn wait_for(sink: &Sink, text: &str) -> Duration {
        let started = std::time::Instant::now();
        while sink.text() != text {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "never written: {text:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        started.elapsed()
    }

    #[test]
    fn a_quiet_line_is_written_by_the_flusher_soon_and_a_burst_in_a_few_writes() {
        let (b, sink) = batched();
        b.spawn_flusher();
        b.push(b"one quiet line\n");
        let waited = wait_for(&sink, "one quiet line\n");
        // COLLECT is 2 ms; the bound leaves room for a loaded machine.
        assert!(waited < Duration::from_millis(500), "{waited:?}");
        assert_eq!(sink.writes(), 1);
        // Again, once the flusher went back to waiting.
        b.push(b"another\n");
        wait_for(&sink, "one quiet line\nanother\n");
        assert_eq!(sink.writes(), 2);

        let mut expected = sink.text();
        for i in 0..2_000 {
            let line = format!("burst line {i}\n");
            b.push(line.as_bytes());
            expected.push_str(&line);
        }
        wait_for(&sink, &expected);
        let writes = sink.writes() - 2;
        assert!(writes <= 200, "2 000 lines took {writes} writes");
    }

    /// A destination whose writes wait until it is opened.
    struct Gated(Sink, Arc<(Mutex<bool>, Condvar)>);

    impl std::io::Write for Gated {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.1;
            let mut open = lock(open);
            while !*open {
                open = opened.wait(open).unwrap_or_else(PoisonError::into_inner);
            }
            self.0.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_destination_never_holds_up_a_thread_that_logs_and_what_does_not_fit_is_counted() {
        let sink = Sink::default();
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let b: &'static Batched<Gated> =
            Box::leak(Box::new(Batched::new(Gated(sink.clone(), gate.clone()))));
        b.spawn_flusher();
        b.push(b"first\n");
        // The flusher takes that line and waits in the stalled write.
        std::thread::sleep(Duration::from_millis(100));
        let line = format!("{}\n", "x".repeat(1023));
        let lines = MAX_PENDING / line.len() + 100;
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..lines {
                b.push(line.as_bytes());
            }
            let _ = done.send(());
        });
        // A bound for a loaded machine, not a speed: without it a regression would hang.
        finished
            .recv_timeout(Duration::from_secs(30))
            .expect("logging waited for the stalled destination");
        assert_eq!(sink.writes(), 0, "the gate is still closed");
        let dropped = b.dropped.load(Ordering::Relaxed);
        assert!((100..=101).contains(&dropped), "{dropped} lines dropped");

        // Once it is open, everything kept arrives, in order.
        let (open, opened) = &*gate;
        *lock(open) = true;
        opened.notify_all();
        let kept = lines - usize::try_from(dropped).unwrap();
        let expected = 6 + kept * 1024;
        let started = std::time::Instant::now();
        while sink.text().len() < expected {
            assert!(started.elapsed() < Duration::from_secs(30), "never written");
            std::thread::sleep(Duration::from_millis(1));
        }
        let text = sink.text();
        assert_eq!(text.len(), expected);
        assert!(text.starts_with("first\nxxx"));
    }

    #[test]
    fn the_panic_path_writes_what_is_pending_and_never_waits_on_a_held_lock() {
        let (b, sink) = batched();
        b.push(b"before the panic\n");
        {
            let _writing = lock(&b.out);
            b.flush_unless_busy();
        }
        assert_eq!(
            sink.text(),
            "",
            "wrote while another writer held the destination"
        );
        b.flush_unless_busy();
        assert_eq!(sink.text(), "before the panic\n");
    }

    #[test]
    fn log_timestamps_are_the_canonical_form() {
        let mut s = String::new();
        fmt::time::FormatTime::format_time(&LogTime, &mut fmt::format::Writer::new(&mut s))
            .unwrap();
        let t = crate::timefmt::parse_strict(&s).unwrap();
        assert_eq!(crate::timefmt::format(t), s);
        assert!((time::OffsetDateTime::now_utc() - t).abs() < time::Duration::minutes(1));
    }

    fn targets(directives: Option<&str>) -> Targets {
        match LogFilter::parse(directives) {
            LogFilter::Static(t) => *t,
            LogFilter::Spans(f) => panic!("{directives:?} read as span directives: {f}"),
        }
    }

    #[test]
    fn target_lists_are_static_filters_with_their_levels() {
        let t = targets(Some("warn,credsync=debug,sqlx=error"));
        assert!(t.would_enable("credsync::sync", &Level::DEBUG));
        assert!(!t.would_enable("credsync::sync", &Level::TRACE));
        assert!(t.would_enable("actix_web", &Level::WARN));
        assert!(!t.would_enable("actix_web", &Level::INFO));
        assert!(!t.would_enable("sqlx::query", &Level::WARN));
    }

    #[test]
    fn unset_empty_or_unreadable_means_info_with_sqlx_at_warn() {
        for d in [None, Some(""), Some("  "), Some("info,[unclosed=debug")] {
            let t = targets(d);
            assert!(t.would_enable("credsync", &Level::INFO), "{d:?}");
            assert!(!t.would_enable("credsync", &Level::DEBUG), "{d:?}");
            assert!(!t.would_enable("sqlx::query", &Level::INFO), "{d:?}");
        }
    }

    #[test]
    fn span_directives_keep_the_env_filter() {
        match LogFilter::parse(Some("info,[request{route=v1.credentials}]=debug")) {
            LogFilter::Spans(f) => assert!(f.to_string().contains("route=v1.credentials")),
            LogFilter::Static(t) => panic!("span directive dropped: {t}"),
        }
    }
    #[tokio::test]
    async fn json_lines_are_one_object_each_with_the_request_id_and_the_current_span() {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || out.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        tracing::info!(
            n = 3,
            ok = true,
            x = 1.5,
            nan = f64::NAN,
            "plain \"quoted\"\n\u{1}\\"
        );
        REQUEST_ID
            .scope("req-1".into(), async {
                tracing::warn!(detail = ?"dbg\\x", "inside");
                tracing::info!(request_id = "own", "own id");
                let span = tracing::info_span!("sync", worker = "w\"1", n = 2);
                let _entered = span.enter();
                tracing::error!("in span");
            })
            .await;
        let text = sink.text();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 4, "{text}");
        for line in &lines {
            let t = line["timestamp"].as_str().unwrap();
            assert!(crate::timefmt::parse_strict(t).is_some(), "{t}");
            assert_eq!(line["target"], "credsync::telemetry::tests");
        }
        let plain = lines[0].as_object().unwrap();
        assert_eq!(plain["level"], "INFO");
        assert_eq!(plain["message"], "plain \"quoted\"\n\u{1}\\");
        assert_eq!(plain["n"], 3);
        assert_eq!(plain["ok"], true);
        assert_eq!(plain["x"], 1.5);
        assert_eq!(plain["nan"], "NaN");
        assert!(!plain.contains_key("request_id") && !plain.contains_key("span"));
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["detail"], "\"dbg\\\\x\"");
        assert_eq!(lines[1]["request_id"], "req-1");
        assert_eq!(lines[2]["request_id"], "own", "the event's own id, once");
        assert_eq!(
            text.lines().nth(2).unwrap().matches("request_id").count(),
            1
        );
        assert_eq!(lines[3]["level"], "ERROR");
        assert_eq!(lines[3]["request_id"], "req-1");
        assert_eq!(
            lines[3]["span"],
            serde_json::json!({"name": "sync", "worker": "w\"1", "n": 2})
        );
    }

    #[test]
    fn a_log_crate_record_is_a_line_under_its_own_target_without_the_log_fields() {
        let sink = Sink::default();
        let out = sink.clone();
        let subscriber = tracing_subscriber::registry().with(json_layer(move || out.clone()));
        let _default = tracing::subscriber::set_default(subscriber);
        // What `LogTracer` does with each record of the `log` crate (actix-web logs through it).
        tracing_log::format_trace(
            &log::Record::builder()
                .args(format_args!("worker {} started", 1))
                .level(log::Level::Warn)
                .target("actix_server::worker")
                .module_path(Some("actix_server::worker"))
                .file(Some("worker.rs"))
                .line(Some(7))
                .build(),
        )
        .unwrap();
        let text = sink.text();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(line["level"], "WARN", "{text}");
        assert_eq!(line["target"], "actix_server::worker");
        assert_eq!(line["message"], "worker 1 started");
        assert!(!text.contains("log."), "{text}");
    }
}
