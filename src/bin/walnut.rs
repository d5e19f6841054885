//! `walnut`: init, add-instance, backup, restore, show, validate, check, metrics, ...
//! Exit 0 on success, 1 on error, 2 on bad usage (see `walnut::cli::walnut_main`).
fn main() {
    std::process::exit(walnut::cli::walnut_main());
}
