-- credential_count_delta's rows are only ever summed and folded (credential_count_compact),
-- never addressed one by one: its bigserial key cost every credential write a sequence step
-- and a b-tree insertion (three per create) and served no query.
alter table credential_count_delta drop column id;
