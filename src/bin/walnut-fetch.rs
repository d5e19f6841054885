//! restore_command = 'walnut-fetch -B DIR --instance NAME %f %p'
//! recovery_end_command = 'walnut-fetch -B DIR --instance NAME --cleanup'
//! Exit 0: written and verified (also `--help`, `--version`); 1: not in the archive (only
//! when definitely absent); 200: corrupt, any other error, a usage error or a panic (fatal
//! to recovery, so it never ends early at a wrong point). A panic must not exit 101, which
//! PostgreSQL would read as "not found".
use walnut::archive::fetch::FetchOutcome;
use walnut::EXIT_FETCH_FATAL;

fn main() {
    walnut::cli::init_logging();
    let cli: walnut::archive::fetch::FetchCli = walnut::cli::parse_or_exit(EXIT_FETCH_FATAL);
    let name = cli.args.name.clone().unwrap_or_else(|| "--cleanup".into());
    let result = walnut::cli::catch_panics("walnut-fetch: FATAL", name.clone(), move || {
        walnut::archive::fetch::run(cli.args)
    });
    let code = match result {
        Some(Ok(FetchOutcome::NotInArchive)) => {
            log::info!("{name} is not in the archive");
            1
        }
        Some(Ok(_)) => 0,
        Some(Err(e)) => {
            eprintln!("walnut-fetch: FATAL: {name}: {e}");
            EXIT_FETCH_FATAL
        }
        // The hook printed what panicked.
        None => EXIT_FETCH_FATAL,
    };
    std::process::exit(code);
}
