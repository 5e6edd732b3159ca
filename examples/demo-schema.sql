-- The demo shop: customers with a balance and PII columns, and their orders.
CREATE TABLE customers (
    id      int PRIMARY KEY,
    name    text NOT NULL,
    email   text,
    phone   text,
    ssn     text,
    balance numeric(12,2) NOT NULL DEFAULT 0
);
CREATE TABLE orders (
    id          serial PRIMARY KEY,
    customer_id int REFERENCES customers(id),
    amount      numeric(12,2),
    status      text DEFAULT 'new',
    created_at  timestamptz DEFAULT now()
);
INSERT INTO customers VALUES
    (1, 'Ada',   'ada@example.com',   '+1-555-0101', '123-45-6789', 100.00),
    (2, 'Grace', 'grace@example.com', '+1-555-0102', '987-65-4321', 250.50);
INSERT INTO orders (customer_id, amount) VALUES (1, 10), (1, 20), (2, 30);
