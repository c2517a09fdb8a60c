//! Logging set-up, in one place: pretty for people, JSON for machines (`CREDSYNC_LOG_FORMAT`).
//! `RUST_LOG` filters (default `info`). Nothing here formats request bodies or headers.
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

use crate::config::LogFormat;

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

/// Install the global subscriber (once; later calls are ignored).
pub fn init(format: LogFormat) {
    let filter = LogFilter::parse(std::env::var("RUST_LOG").ok().as_deref());
    let registry = tracing_subscriber::registry().with(filter.into_layer());
    let _ = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .try_init(),
        LogFormat::Pretty => registry
            .with(fmt::layer().with_writer(std::io::stderr))
            .try_init(),
    };
}

#[cfg(test)]
mod tests {
    use tracing::Level;

    use super::*;

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
}
