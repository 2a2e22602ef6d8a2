use std::process::ExitCode;

// glibc's allocator kept 166 MB resident with 100,000 cached keys where
// mimalloc keeps 145 MB (its per-thread arenas fragment less); it is also
// the faster of the two on the allocation-heavy gRPC path (BENCHMARKS.md,
// scenario 6 and 9). The binary's choice only: the library crates leave it
// to whoever embeds them.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    keygate::cli::run().await
}
