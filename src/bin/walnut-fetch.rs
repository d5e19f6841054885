fn main() {
    eprintln!("usage: walnut-fetch -B DIR --instance NAME %f %p (not implemented yet)");
    std::process::exit(walnut::EXIT_FETCH_FATAL);
}
