fn main() {
    eprintln!("usage: walnut-archive -B DIR --instance NAME %p %f (not implemented yet)");
    std::process::exit(1);
}
