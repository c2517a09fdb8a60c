//! The `credsync` binary: everything lives in the library (`credsync::cli`).

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// buffers on each worker thread, which mimalloc's thread-local free lists serve with less work
/// (−10 to −15 % CPU per forwarded read, docs/benchmarks.md). Built with `no_thp`: mimalloc
/// otherwise asks for transparent huge pages, and 2 MiB pages doubled the idle RSS (21 MiB with
/// the feature, 40 without, 18 with glibc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credsync::cli::main()
}
