//! archive_command = 'walnut-archive -B DIR --instance NAME %p %f'
//! Exit 0 only when the file is durable in the archive (also `--help`, `--version`); 1 on
//! any failure, a usage error or a panic.
fn main() {
    std::process::exit(walnut::cli::archive::main_archive());
}
