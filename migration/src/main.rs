//! `sea-orm-cli migrate`'s entry point: `up`, `down`, `status`, `fresh`, … against `DATABASE_URL`.

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(migration::Migrator).await;
}
