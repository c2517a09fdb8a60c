//! The `credsync` binary: everything lives in the library (`credsync::cli`).

/// mimalloc instead of glibc's malloc: the request path allocates many small, short-lived
/// buffers on each worker thread, which mimalloc's thread-local free lists serve with less work
/// (measured in docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credsync::cli::main()
}
