use clap::Parser;

fn main() {
    let cli = hrm_cu::cli::Cli::parse();
    if let Err(e) = hrm_cu::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
