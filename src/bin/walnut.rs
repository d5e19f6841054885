use clap::Parser;

fn main() {
    walnut::cli::init_logging();
    let cli = walnut::cli::WalnutCli::parse();
    match walnut::cli::run_walnut(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("walnut: error: {e}");
            std::process::exit(1);
        }
    }
}
