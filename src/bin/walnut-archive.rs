//! archive_command = 'walnut-archive -B DIR --instance NAME %p %f'
//! Exit 0 only when the file is durable in the archive; 1 on any failure.
use clap::Parser;

fn main() {
    walnut::cli::init_logging();
    let cli = walnut::archive::push::PushCli::parse();
    let name = cli.args.name.clone();
    match walnut::archive::push::run(cli.args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("walnut-archive: ERROR: {name}: {e}");
            std::process::exit(1);
        }
    }
}
