//! archive_command = 'walnut-archive -B DIR --instance NAME %p %f'
//! Exit 0 only when the file is durable in the archive (also `--help`, `--version`); 1 on
//! any failure, a usage error or a panic.
use clap::Parser;

fn main() {
    walnut::cli::init_logging();
    let cli = match walnut::archive::push::PushCli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            std::process::exit(if e.use_stderr() { 1 } else { 0 });
        }
    };
    let name = cli.args.name.clone();
    let what = name.clone();
    // Panics caught inside (a WAL decoder thread's, which only costs the index) are
    // reported as warnings there; one that reaches main fails the call with exit 1.
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
            "walnut-archive: {what}: internal error: panic at {at}: {}",
            msg.replace('\n', " ")
        );
    }));
    let result = std::panic::catch_unwind(move || {
        // Test hook: proves that a panic below exits 1, not 101.
        if std::env::var_os("WALNUT_TEST_PANIC").is_some() {
            panic!("panic requested by WALNUT_TEST_PANIC");
        }
        walnut::archive::push::run(cli.args)
    });
    let code = match result {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => {
            eprintln!("walnut-archive: ERROR: {name}: {e}");
            1
        }
        Err(_) => 1,
    };
    std::process::exit(code);
}
