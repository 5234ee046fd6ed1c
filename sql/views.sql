-- Views users and scripts query: the stable surface of the catalogue.
-- Portable SQL (SQLite and PostgreSQL). Recreated by the first `cxrlabel` start-up after this
-- file changes (its sha256 is stored), so edits take effect without touching stored data.

-- One row per catalogued image, with its group (NULL when the rules chose none).
CREATE VIEW catalogue AS
SELECT i.uid, i.patient_id, i.age, i.sex, i.view, i.study_date, i.text,
       g.group_name, i.source, i.labels, i.path, i.width, i.height
FROM images i
LEFT JOIN groups g ON g.uid = i.uid;

-- One row per labelled image and model: the measurements users analyse.
CREATE VIEW label_results AS
SELECT m.uid, g.group_name, m.model, m.run_id, m.ctr, m.ctr_missing,
       m.heart_area_px, m.heart_area_mm2, m.heart_width_px, m.thoracic_width_px,
       m.heart_width_mm, m.thoracic_width_mm, m.quality, m.labelled_at,
       i.patient_id, i.age, i.sex, i.view, i.source
FROM measurements m
JOIN images i ON i.uid = m.uid
LEFT JOIN groups g ON g.uid = m.uid;
