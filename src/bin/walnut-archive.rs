//! archive_command = 'walnut-archive -B DIR --instance NAME %p %f'
//! Exit 0 only when the file is durable in the archive (also `--help`, `--version`); 1 on
//! any failure, a usage error or a panic.
fn main() {
    walnut::cli::init_logging();
    let cli: walnut::archive::push::PushCli = walnut::cli::parse_or_exit(1);
    let name = cli.args.name.clone();
    // Panics caught inside (a WAL decoder thread's, which only costs the index) are
    // reported as warnings there; one that reaches main fails the call with exit 1.
    let result = walnut::cli::catch_panics("walnut-archive", name.clone(), move || {
        walnut::archive::push::run(cli.args)
    });
    let code = match result {
        Some(Ok(code)) => code,
        Some(Err(e)) => {
            eprintln!("walnut-archive: ERROR: {name}: {e}");
            1
        }
        // The hook printed what panicked.
        None => 1,
    };
    std::process::exit(code);
}
