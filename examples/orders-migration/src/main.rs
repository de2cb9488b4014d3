//! `sea-orm-cli migrate -d examples/orders-migration` runs this: `up`, `down`, `status`, `fresh`,
//! ... against `DATABASE_URL`.

#[tokio::main]
async fn main() {
    sea_orm_migration::cli::run_cli(orders_migration::Migrator).await;
}
