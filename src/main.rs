//! The `credsync` binary: everything lives in the library (`credsync::cli`).
fn main() -> std::process::ExitCode {
    credsync::cli::main()
}
