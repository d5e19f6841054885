//! restore_command = 'walnut-fetch -B DIR --instance NAME %f %p'
//! recovery_end_command = 'walnut-fetch -B DIR --instance NAME --cleanup'
//! Exit 0: written and verified (also `--help`, `--version`); 1: not in the archive (only
//! when definitely absent); 200: corrupt, any other error, a usage error or a panic (fatal
//! to recovery, so it never ends early at a wrong point). A panic must not exit 101, which
//! PostgreSQL would read as "not found".
fn main() {
    std::process::exit(walnut::cli::archive::main_fetch());
}
