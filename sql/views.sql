-- Views users and scripts query: the stable surface of the catalogue.
-- Portable SQL (SQLite and PostgreSQL). Recreated by the first `cxrlabel` start-up after this
-- file changes (its sha256 is stored), so edits take effect without touching stored data.

-- One row per catalogued image, with its group (NULL when the rules chose none).
CREATE VIEW catalogue AS
SELECT i.uid, i.patient_id, i.age, i.sex, i.view, i.study_date, i.text,
       g.group_name, i.source, i.labels, i.path, i.width, i.height, i.report_ctr
FROM images i
LEFT JOIN groups g ON g.uid = i.uid;

-- One row per labelled image and model: the measurements users analyse. `quality` is the
-- estimated mean Dice of the image's masks (quality_<structure>: per structure, where the model
-- has a fitted score); `trust`: the review worklist's order, 0 first (the quality together with
-- how plainly the film shows the heart's width-setting borders, against the films the score was
-- fitted on; NULL where the score carries none). `view` as catalogued (PA, AP, LL...;
-- 'unknown' when not recorded); `ctr_note` says when the usual CTR > 0.5 rule does not read as
-- on a PA film. `report_ctr`: the CTR the report itself states (КТИ 0,58), where it states one. `review`: the latest
-- decision a person took on the image's masks (accepted, rejected, corrected; NULL: not
-- reviewed); `reviewed_ctr`: the CTR from the masks as reviewed (NULL unless accepted or corrected).
-- `input_check`: 'ok', or why the film does not read as a frontal chest radiograph the model
-- can read (not a chest film, turned, flipped, cropped; NULL: labelled before the check);
-- such films have quality 0, and CTR statistics leave them out unless asked (`in_statistics`).
-- `patient_film`: 1 for the film a comparison of groups counts for its patient (the patient's
-- earliest film in that group that the input check passed and that has a CTR; undated films
-- after dated ones, then by uid; a film without a patient id is a patient of its own), 2, 3...
-- for the others.
-- `mm_calibration`: where the millimetres' pixel spacing came from (PixelSpacing,
-- ImagerPixelSpacing with or without the magnification factor, NIH's spacing of the original
-- scaled to the file's pixels, a CSV column), or 'none: ...' and why (no spacing, a spacing
-- of 0, one that makes an implausible film width).
-- `ctr_calibrated`: the CTR the site's own readers would draw, where `cxrlabel calibrate` fitted the
-- model's weights at the film's site (its source) on films of that site; `ctr` stays the model's.
-- `ctr_calibration` says which calibration and how many films stand behind it.
-- `outside_norms`: a film the CTR norms do not describe, marked, never refused: an AP view (the
-- heart is magnified) or a child (under 16, where the catalogue knows the age).
CREATE VIEW label_results AS
SELECT m.uid, g.group_name, m.model, m.run_id, m.ctr, m.ctr_missing,
       m.heart_area_px, m.heart_area_mm2, m.heart_width_px, m.thoracic_width_px,
       m.heart_width_mm, m.thoracic_width_mm, m.quality,
       m.quality_heart, m.quality_left_lung, m.quality_right_lung, m.trust, m.labelled_at,
       i.patient_id, i.age, i.sex, COALESCE(UPPER(i.view), 'unknown') AS view,
       CASE WHEN UPPER(i.view) = 'AP' THEN 'AP film: the heart is magnified, CTR reads high (0.5 rule is for PA)'
            WHEN UPPER(i.view) IN ('LL', 'RL', 'LAT', 'LATERAL') THEN 'lateral film: no frontal CTR'
            WHEN i.view IS NULL OR UPPER(i.view) NOT IN ('PA', 'AP') THEN 'view unknown'
       END AS ctr_note,
       i.report_ctr, i.source,
       (SELECT r.decision FROM reviews r WHERE r.uid = m.uid AND r.model = m.model
        ORDER BY r.version DESC, r.id DESC LIMIT 1) AS review,
       m.reviewed_ctr,
       lr.heart_definition,
       m.input_check, m.mm_calibration,
       CASE WHEN UPPER(i.view) = 'AP' AND i.age < 16 THEN 'AP view, child'
            WHEN UPPER(i.view) = 'AP' THEN 'AP view'
            WHEN i.age < 16 THEN 'child'
       END AS outside_norms,
       CASE WHEN m.input_check IS NULL OR m.input_check = 'ok' THEN 1 ELSE 0 END AS in_statistics,
       CASE WHEN m.ctr IS NOT NULL THEN cal.intercept + cal.slope * m.ctr END AS ctr_calibrated,
       CASE WHEN cal.site IS NOT NULL THEN cal.kind || ' calibration for ' || cal.site || ', '
            || cal.films || ' films' END AS ctr_calibration,
       ROW_NUMBER() OVER (
           PARTITION BY m.model, g.group_name, COALESCE(i.source || ':' || i.patient_id, 'film:' || m.uid)
           ORDER BY CASE WHEN m.input_check IS NULL OR m.input_check = 'ok' THEN 0 ELSE 1 END,
                    CASE WHEN m.ctr IS NULL THEN 1 ELSE 0 END,
                    CASE WHEN i.study_date IS NULL THEN 1 ELSE 0 END, i.study_date, m.uid) AS patient_film
FROM measurements m
JOIN images i ON i.uid = m.uid
LEFT JOIN groups g ON g.uid = m.uid
LEFT JOIN label_runs lr ON lr.id = m.run_id
LEFT JOIN ctr_calibrations cal ON cal.model_sha256 = lr.model_sha256 AND cal.site = i.source;
