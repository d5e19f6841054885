//! restore_command = 'walnut-fetch -B DIR --instance NAME %f %p'
//! recovery_end_command = 'walnut-fetch -B DIR --instance NAME --cleanup'
//! Exit 0: written and verified (also `--help`, `--version`); 1: not in the archive (only
//! when definitely absent); 200: corrupt, any other error, a usage error or a panic (fatal
//! to recovery, so it never ends early at a wrong point). A panic must not exit 101, which
//! PostgreSQL would read as "not found".
use clap::Parser;
use walnut::archive::fetch::FetchOutcome;
use walnut::EXIT_FETCH_FATAL;

fn main() {
    walnut::cli::init_logging();
    let cli = match walnut::archive::fetch::FetchCli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { EXIT_FETCH_FATAL } else { 0 });
        }
    };
    let name = cli.args.name.clone().unwrap_or_else(|| "--cleanup".into());
    let what = name.clone();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let at = info.location().map(|l| l.to_string()).unwrap_or_default();
        // One line, as PostgreSQL logs it.
        eprintln!(
            "walnut-fetch: FATAL: {what}: internal error: panic at {at}: {}",
            msg.replace('\n', " ")
        );
    }));
    let result = std::panic::catch_unwind(move || {
        // Test hook: proves that a panic anywhere below is fatal to recovery (exit 200).
        if std::env::var_os("WALNUT_TEST_PANIC").is_some() {
            panic!("panic requested by WALNUT_TEST_PANIC");
        }
        walnut::archive::fetch::run(cli.args)
    });
    let code = match result {
        Ok(Ok(FetchOutcome::NotInArchive)) => {
            log::info!("{name} is not in the archive");
            1
        }
        Ok(Ok(_)) => 0,
        Ok(Err(e)) => {
            eprintln!("walnut-fetch: FATAL: {name}: {e}");
            EXIT_FETCH_FATAL
        }
        // The hook printed what panicked.
        Err(_) => EXIT_FETCH_FATAL,
    };
    std::process::exit(code);
}
