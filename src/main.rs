use std::process::ExitCode;

#[tokio::main]
async fn main() -> ExitCode {
    keygate::cli::run().await
}
