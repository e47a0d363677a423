use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = tracer::cli::Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tracer: error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tracer::app::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tracer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
