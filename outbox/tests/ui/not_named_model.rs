#[outbox::publish(destination = "/topic/orders")]
pub struct Order {
    pub id: i32,
}

fn main() {}
