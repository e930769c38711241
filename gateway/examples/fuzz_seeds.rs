//! Writes the seed corpora of the gateway's fuzz targets:
//! `cargo run -p sibyl-gateway --features fuzzing --example fuzz_seeds -- fuzz/seeds`.

fn main() -> std::io::Result<()> {
    let root = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/seeds".into());
    for (target, name, bytes) in sibyl_gateway::fuzzing::seeds() {
        let dir = std::path::Path::new(&root).join(target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
    }
    Ok(())
}
