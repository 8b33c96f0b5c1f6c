//! Rebuilds when a migration is added: `sqlx::migrate!` embeds `migrations/` at compile time, and only the files
//! it already embedded are tracked by the compiler.

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
