//! restore_command = 'walnut-fetch -B DIR --instance NAME %f %p'
//! recovery_end_command = 'walnut-fetch -B DIR --instance NAME --cleanup'
//! Exit 0: written and verified; 1: not in the archive; 200: corrupt or any other error
//! (fatal to recovery, so it never ends early at a wrong point).
use clap::Parser;
use walnut::archive::fetch::FetchOutcome;

fn main() {
    walnut::cli::init_logging();
    let cli = match walnut::archive::fetch::FetchCli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(walnut::EXIT_FETCH_FATAL);
        }
    };
    let name = cli.args.name.clone().unwrap_or_else(|| "--cleanup".into());
    match walnut::archive::fetch::run(cli.args) {
        Ok(FetchOutcome::NotInArchive) => {
            log::info!("{name} is not in the archive");
            std::process::exit(1);
        }
        Ok(_) => std::process::exit(0),
        Err(e) => {
            eprintln!("walnut-fetch: FATAL: {name}: {e}");
            std::process::exit(walnut::EXIT_FETCH_FATAL);
        }
    }
}
