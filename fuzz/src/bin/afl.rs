//! The AFL++ harness: `afl-fuzz -i … -o … -- afl <target>` (see
//! `scripts/fuzz`). Run outside afl-fuzz it reads one input from stdin.

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = botline_fuzz::target(&name) else {
        let names: Vec<&str> = botline_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: afl <target>; targets: {}", names.join(" "));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| (target.run)(data));
}
